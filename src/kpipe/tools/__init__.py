"""Tools beside the pipeline, in the interface layer: the benchmark (`kpipe bench`).

May import anything below it; nothing in the library or the stages imports a tool.
"""

"""Stages: one module per `kpipe` command, each a thin `run(cfg)` over the libraries.

audit, folds, train, relabel, infer, oof-tta, ensemble, kaggle (download, submit, lb), package and
kernel (code competitions), demo.
Stages hand over through files (kpipe.paths names them all), so a stage never imports another
stage; each may import the foundation and every library (data, nn, eval, kaggle). Only the
interface layer (cli, launch, tools) reads the command line.
"""

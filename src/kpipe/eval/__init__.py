"""Evaluation library: metrics, the OOF table, blending, cleaning, reports and the review page.

metrics (the metric registry, one definition of every score), oof (the one owner of the OOF table
`id, fold, label, p_<class>...`), blend (blend weights fitted on OOF), cleaning (confident learning
over OOF), reports (curves, confusion, per-class tables), review (the static review page).
May import the foundation, kpipe.data and kpipe.nn.
"""

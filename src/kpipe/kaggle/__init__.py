"""Kaggle library: the submission format, the ledger, and the client behind every Kaggle call.

submission (build and validate a CSV against sample_submission), ledger (submissions/ledger.csv,
locked appends), api (credentials, the kaggle client, retries with back-off).
May import the foundation and the data, nn and eval libraries.
"""

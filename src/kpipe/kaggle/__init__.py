"""Kaggle library: the submission format, the ledger, and the client behind every Kaggle call.

submission (build and validate a CSV against sample_submission), ledger (submissions/ledger.csv,
locked appends), api (credentials, the kaggle client, retries with back-off); for code competitions
package (the package format: safetensors folds, spec, wheel, manifest), notebook (the inference
notebook as JSON), datasets (upload the package, wait until ready), kernels (push, wait, fetch output).
May import the foundation and the data, nn and eval libraries.
"""

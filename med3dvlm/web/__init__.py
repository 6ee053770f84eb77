"""The web page for one scan (``python -m med3dvlm.app``): :mod:`~med3dvlm.web.session` holds what it
does (models, uploads, views, prompts, answers) without a browser; :mod:`~med3dvlm.web.page` lays it
out with Gradio; :mod:`~med3dvlm.web.uploads` keeps what a scan leaves on disk in one folder, removed
however the app stops."""

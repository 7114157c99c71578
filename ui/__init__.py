"""The lite-srpo Gradio app: launch, monitor, token role viewer, stop/resume, export, try-the-model, runs.

Build it with `ui.app.build_app(...)`; serve it with `ui.app.launch(...)` (`lite-srpo ui`)
or `python ui/app.py`. Pure helpers (event parsing, token shading, form validation, process records)
live in their own modules so they are tested without a browser.
"""

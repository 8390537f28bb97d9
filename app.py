"""The Abliterator Space: `python app.py` (serves on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT, default 127.0.0.1:7860)."""

from __future__ import annotations

import os

from space.ui import QUEUE_SETTINGS, build_demo

demo = build_demo()

if __name__ == "__main__":
    from space.warmup import warm_demo_model

    warm_demo_model()
    demo.queue(**QUEUE_SETTINGS).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )

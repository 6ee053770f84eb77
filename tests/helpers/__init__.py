"""What the tests share: tiny prepared data (``data``), the SigLIP stage on it (``siglip``), the VLM
stages on a tiny Qwen (``vlm``), and callbacks the run tests inject through the CLI (``runs``)."""

"""What the tests share: tiny prepared data (``data``), the SigLIP stage on it (``siglip``), the VLM
stages on a tiny Qwen (``vlm``), every stage built alike in each process with its one-process
references (``distributed``), callbacks the run tests inject through the CLI (``runs``), and the
package's commands run as a user does or inside the test's process (``commands``)."""

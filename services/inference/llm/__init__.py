"""Language model inference server (vLLM engine), internal only."""

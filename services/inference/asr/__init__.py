"""Speech recognition inference server (faster-whisper), internal only."""

"""Encoders: waveform batches (16 kHz mono) -> embeddings. Registry in `monitor.encoders.registry`."""

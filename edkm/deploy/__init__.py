"""Deployment: Core ML export with edkm's exact LUTs, text generation, HF-style folders."""

"""Code generated from the Open Inference Protocol proto by generate.py; do not edit."""

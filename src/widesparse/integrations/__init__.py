"""Bridges to other tools (timm); each imports its tool only when used."""

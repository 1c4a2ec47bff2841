"""lorakit's zoo: data, not code (presets, bundled configs, trained adapters)."""

// Per-session anchor buffers (see docs/ARCHITECTURE.md, "Anchor buffering").

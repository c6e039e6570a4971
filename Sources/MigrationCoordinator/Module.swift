// The reconfiguration protocol of paper §3 (see docs/ARCHITECTURE.md, "Reconfiguration").

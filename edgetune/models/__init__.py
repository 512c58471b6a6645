"""Model loading and the per-architecture facts the rewrite passes need."""

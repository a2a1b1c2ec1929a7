//! Whole requests through `StableDiffusion::generate`: seeds, batches, progress, cancelling.

//! Policy losses averaged per sequence then over the batch, with completion-level ratios, on-policy and chunked-logits variants.

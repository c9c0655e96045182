//! Value-function losses: clipped and unclipped squared error, value clip fraction.

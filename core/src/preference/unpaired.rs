//! Unpaired preference losses (KTO, BCO) and process reward losses.

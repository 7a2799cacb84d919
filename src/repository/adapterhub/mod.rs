//! AdapterHub adapters as data (issue 12). `types` is the contract between the parser (banks-load)
//! and the adapter banks (banks-core); the parser fills it from an adapter directory.

pub mod types;

pub use self::types::{Activation, AdapterWeights, BottleneckWeights, HeadWeights, RULE_FLAGS, Residual, SlotRule};

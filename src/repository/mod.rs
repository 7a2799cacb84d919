//! The model repository on disk (format v1, `models/README.md`) and what is loaded from it.

pub mod adapterhub;
pub mod backbone;
pub mod bundle;
pub mod embedding;
pub mod fusion;
pub mod graph_check;
mod graph_shapes;
mod loader;
pub mod manifest;
pub mod onnx_proto;
mod readahead;
pub mod registrar;
pub mod registry;
mod scan;
pub mod store;
pub mod task;
mod trial;

pub use backbone::Backbone;
pub use bundle::{Bundle, ValidationLimits};
pub use fusion::{FusedAdapter, FusionSlot};
pub use manifest::Location;
pub use registrar::{MAX_VERSION, RegisterOptions, Registered, Registrar};
pub use registry::{Registry, TaskEntry, TaskState};
pub use task::{ActiveLayers, Task};

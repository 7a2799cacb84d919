//! The settings with a fixed set of values (enums parsed from their documented spellings).

use serde::{Deserialize, Serialize};

/// Settings with a fixed set of values are enums: an unknown value stops start-up with a message
/// naming the key and the allowed values, never a silent fall-back. `FromStr` parses the same
/// spellings (for tools that read one value from elsewhere).
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every accepted spelling, in documentation order.
            pub const ALLOWED: &[&str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown value `{}` (allowed: {})",
                        other.escape_debug(),
                        Self::ALLOWED.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

choice!(
    /// ONNX Runtime graph optimization level (`runtime.optimization_level`).
    OptimizationLevel {
        Disable = "disable",
        Basic = "basic",
        Extended = "extended",
        All = "all",
    }
);

choice!(
    /// Where graphs run (`runtime.execution_provider`).
    ExecutionProvider {
        Cpu = "cpu",
        Cuda = "cuda",
    }
);

choice!(
    /// Whether the bank path's layer runs go through ONNX Runtime's IoBinding
    /// (`runtime.io_binding`, `src/runtime/bound.rs`): `auto` is on under CUDA and off on the CPU.
    IoBinding {
        Auto = "auto",
        On = "on",
        Off = "off",
    }
);

choice!(
    /// Which layer graph the bank path runs (`runtime.layer_graph`): `dispatch` (`layer.onnx`, whose
    /// `If`s skip what a batch does not use) or `capturable` (`layer_capturable.onnx`, the same numbers
    /// without control flow, which CUDA graphs need; `runtime.cuda_graphs` implies it).
    LayerGraph {
        Dispatch = "dispatch",
        Capturable = "capturable",
    }
);

choice!(
    /// Log line format (`log.format`).
    LogFormat {
        /// Human-readable lines.
        Text = "text",
        /// One JSON object per line.
        Json = "json",
    }
);

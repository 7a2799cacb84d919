//! What the AdapterHub parser returns: one validated bottleneck adapter and its head, as data the
//! adapter banks (issue 12) stack into tensors.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2};

use crate::repository::manifest::{HeadKind, Location};

/// One AdapterHub adapter + head, validated against a backbone.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    pub name: String,
    /// `method` as task.json names it: `seq_bn`, `double_seq_bn`, `bottleneck`, `par_bn`, `lora` or `ia3`.
    pub method: String,
    pub rule: SlotRule,
    /// (layer, location) -> weights, for every layer not in `leave_out` and every location the config uses.
    pub slots: BTreeMap<(usize, Location), BottleneckWeights>,
    /// LoRA / (IA)^3: layer -> the projections it changes there (empty for bottleneck adapters).
    pub methods: BTreeMap<usize, super::lora::LayerMethods>,
    pub leave_out: Vec<usize>,
    pub head: HeadWeights,
}

/// torch `nn.Linear` layout (`[out, in]`): `down_w [r, H]`, `down_b [r]`, `up_w [H, r]`, `up_b [H]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BottleneckWeights {
    pub down_w: Array2<f32>,
    pub down_b: Array1<f32>,
    pub up_w: Array2<f32>,
    pub up_b: Array1<f32>,
}

impl BottleneckWeights {
    /// Bottleneck width `r`.
    pub fn width(&self) -> usize {
        self.down_w.nrows()
    }
}

/// The slot rule of `models/README.md` as data:
/// `u = LN(h + x)` if `ln_before` else `h`; `r` per [`Residual`]; `out = scaling * A(u) + r`;
/// `y = LN(out + x)` if `ln_after` else `out`. A `parallel` adapter (`par_bn`) reads `u = x`, the
/// sub-layer's input, instead (the library's ParallelAdapter; its residual is then `h`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotRule {
    pub ln_before: bool,
    pub ln_after: bool,
    pub residual: Residual,
    pub activation: Activation,
    pub scaling: f32,
    pub parallel: bool,
}

/// `residual_before_ln`: `true` -> `h`, `false` -> `u`, `"post_add"` -> `h + x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    H,
    U,
    HPlusX,
}

/// The bottleneck non-linearity (`swish` is `silu`, `gelu_orig` is exact `gelu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
    Gelu,
    Tanh,
    Sigmoid,
}

impl Activation {
    /// Order of the activation one-hot in a bank rule row.
    pub const ALL: [Activation; 5] = [Self::Relu, Self::Silu, Self::Gelu, Self::Tanh, Self::Sigmoid];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Silu => "silu",
            Self::Gelu => "gelu",
            Self::Tanh => "tanh",
            Self::Sigmoid => "sigmoid",
        }
    }
}

/// Number of flags in a bank rule row: lnb, lna, f_h, f_u, f_s, scale, the activation one-hot, parallel.
pub const RULE_FLAGS: usize = 12;

impl SlotRule {
    /// The bank rule row `[lnb, lna, f_h, f_u, f_s, scale, relu, silu, gelu, tanh, sigmoid, parallel]`.
    pub fn flags(&self) -> [f32; RULE_FLAGS] {
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        let mut f = [0.0; RULE_FLAGS];
        f[0] = b(self.ln_before);
        f[1] = b(self.ln_after);
        f[2] = b(self.residual == Residual::H);
        f[3] = b(self.residual == Residual::U);
        f[4] = b(self.residual == Residual::HPlusX);
        f[5] = self.scaling;
        for (k, a) in Activation::ALL.iter().enumerate() {
            f[6 + k] = b(*a == self.activation);
        }
        f[11] = b(self.parallel);
        f
    }
}

/// A two-layer classification (or, with one output, regression) head:
/// `logits = W2 tanh(W1 h0 + b1) + b2` on the first token `h0`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadWeights {
    pub kind: HeadKind,
    /// label2id order; empty for regression.
    pub labels: Vec<String>,
    pub w1: Array2<f32>,
    pub b1: Array1<f32>,
    pub w2: Array2<f32>,
    pub b2: Array1<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_rule_flags() {
        let r = SlotRule {
            ln_before: true,
            ln_after: true,
            residual: Residual::H,
            activation: Activation::Silu,
            scaling: 2.0,
            parallel: false,
        };
        assert_eq!(r.flags(), [1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let r = SlotRule {
            ln_before: false,
            ln_after: false,
            residual: Residual::HPlusX,
            activation: Activation::Sigmoid,
            scaling: 1.0,
            parallel: false,
        };
        assert_eq!(r.flags(), [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let r = SlotRule {
            ln_before: false,
            ln_after: true,
            residual: Residual::H,
            activation: Activation::Relu,
            scaling: 4.0,
            parallel: true,
        };
        assert_eq!(r.flags(), [0.0, 1.0, 1.0, 0.0, 0.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    }
}

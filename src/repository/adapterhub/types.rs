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
    /// `Stack(lower, this)`: the lower adapter (`stack/`), if the task is a stack.
    pub stack: Option<super::stack::StackLower>,
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

    /// The library's name for it (lower case); `swish` is `silu`, `gelu_orig` is exact `gelu`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "swish" | "silu" => Self::Silu,
            "gelu" | "gelu_orig" => Self::Gelu,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            _ => return None,
        })
    }

    /// The function on one value, for heads run on the host (`gelu` is the exact, erf form).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Self::Relu => x.max(0.0),
            Self::Silu => x / (1.0 + (-x).exp()),
            Self::Gelu => (0.5 * x as f64 * erfc(-x as f64 / std::f64::consts::SQRT_2)) as f32,
            Self::Tanh => x.tanh(),
            Self::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        }
    }

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

/// Complementary error function, fractional error below 1.2e-7 everywhere (Numerical Recipes'
/// Chebyshev fit; std has no erf), enough for f32 heads.
fn erfc(x: f64) -> f64 {
    const C: [f64; 10] =
        [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277];
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = C.iter().rev().fold(0.0, |acc, c| c + t * acc);
    let ans = t * (-z * z + poly).exp();
    if x >= 0.0 { ans } else { 2.0 - ans }
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

/// An AdapterHub prediction head as data, as the library's `PredictionHead.build` makes it: linear
/// layers in order (torch layout `[out, in]`), `activation` after every one but the last. Sequence
/// heads read the first token, token heads (tagging, QA) every token.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadWeights {
    pub kind: HeadKind,
    /// label2id order; empty for regression and question answering.
    pub labels: Vec<String>,
    /// At least one layer; the last one's rows are the head's outputs per position.
    pub layers: Vec<HeadLayer>,
    /// `activation_function`; `None` when the config has none (`null` or `""`).
    pub activation: Option<Activation>,
}

/// One `nn.Linear` of a head: `y = W x + b` (`b` is zero for a last layer saved with `bias=False`).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadLayer {
    pub w: Array2<f32>,
    pub b: Array1<f32>,
}

impl HeadWeights {
    /// Outputs per position (labels, 2 for QA's start/end, 1 for regression).
    pub fn width(&self) -> usize {
        self.layers.last().map_or(0, |l| l.w.nrows())
    }
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

    #[test]
    fn host_activations_match_their_definitions() {
        // gelu(x) = x * Phi(x); Phi at 1, -1, 2 from tables (1e-9).
        for (x, phi) in [(1.0f32, 0.841_344_746), (-1.0, 0.158_655_254), (2.0, 0.977_249_868), (0.0, 0.5)] {
            let got = Activation::Gelu.apply(x);
            assert!((got as f64 - x as f64 * phi).abs() < 1e-6, "gelu({x}) = {got}");
        }
        assert_eq!(Activation::Relu.apply(-2.0), 0.0);
        assert!((Activation::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((Activation::Sigmoid.apply(0.0) - 0.5).abs() < 1e-7);
        assert_eq!(Activation::parse("swish"), Some(Activation::Silu));
        assert_eq!(Activation::parse("gelu_new"), None);
    }
}

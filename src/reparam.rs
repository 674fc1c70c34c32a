//! Re-parameterization: fold a model trained with branches into its deploy (or plain) form.
//!
//! Every re-parameterized conv (N kxk conv+BN branches, the 1x1 scale branch, the BN identity)
//! becomes one kxk conv with bias (`RepConv::fold`); every other tensor is copied by name. Works
//! for any registered model: the train and deploy forms list their `rep_convs()` in the same order.
//! Where the deploy form is plain conv + BN (every model but GhostNetV3), the folded kernel goes
//! into the conv and the bias into a BN that is the identity in eval mode. The deploy form in eval
//! mode then gives the train form's eval outputs up to float rounding.

use crate::models::ghostnet::{GhostNet, GhostNetConfig};
use crate::models::{self, Model, ModelOptions, Network};
use crate::nn::layers::BN_EPS;
use crate::nn::{Id, RepConv};
use crate::Tensor;
use anyhow::{bail, Result};

/// A network that can be folded: `Model` (any registered model) and `GhostNet` itself.
pub trait Foldable: Sized {
    /// The deploy (or plain) form with the folded weights.
    fn folded(&self) -> Result<Self>;
}

/// Folds a model trained with branches; an error if nothing is left to fold.
pub fn fold<M: Foldable>(train: &M) -> Result<M> {
    train.folded()
}

fn has_branches(n: &dyn Network) -> bool {
    n.rep_convs()
        .iter()
        .any(|r| matches!(r, RepConv::Train { .. }))
}

impl Foldable for Model {
    fn folded(&self) -> Result<Model> {
        if self.is_deploy() {
            bail!("the model is already in deploy (folded) form");
        }
        let opts = ModelOptions {
            deploy: true,
            ..self.options()
        };
        let mut deploy = models::create(self.name(), &opts)?;
        fold_into(self.network(), deploy.network_mut())?;
        Ok(deploy)
    }
}

impl Foldable for GhostNet {
    fn folded(&self) -> Result<GhostNet> {
        if !has_branches(self) {
            bail!("the model is already in deploy (folded) form");
        }
        let cfg = GhostNetConfig {
            deploy: true,
            ..self.cfg
        };
        let mut deploy = GhostNet::new(cfg, 0)?;
        fold_into(self, &mut deploy)?;
        Ok(deploy)
    }
}

/// Writes the folded weights of `train` into `deploy` (built in its deploy form).
fn fold_into(train: &dyn Network, deploy: &mut dyn Network) -> Result<()> {
    let ts = train.state();
    let mut written_p = vec![false; deploy.state().params.len()];
    let mut written_b = vec![false; deploy.state().buffers.len()];
    // (folded kernel and bias, the deploy conv or conv + BN to write them to)
    let mut pairs = Vec::new();
    let (tr, dr) = (train.rep_convs(), deploy.rep_convs());
    if tr.len() != dr.len() {
        bail!(
            "train form has {} re-parameterizable convs, deploy form {}",
            tr.len(),
            dr.len()
        );
    }
    for (t, d) in tr.into_iter().zip(dr) {
        let Some(folded) = t.fold(ts) else {
            bail!("a re-parameterized conv is already folded")
        };
        pairs.push((folded, d.clone()));
    }
    let ds = deploy.state_mut();
    for ((w, b), d) in pairs {
        match d {
            RepConv::Deploy(conv) => {
                let bias = conv.bias.expect("deploy conv has a bias");
                ds.params.slice_mut(conv.weight).copy_from_slice(&w);
                ds.params.slice_mut(bias).copy_from_slice(&b);
                written_p[conv.weight.0] = true;
                written_p[bias.0] = true;
            }
            RepConv::Plain(cb) => {
                // Eval BN y = (x - m) g / sqrt(v + eps) + b is the identity plus bias for m = 0,
                // v = 1 - eps, g = 1.
                ds.params.slice_mut(cb.conv.weight).copy_from_slice(&w);
                ds.params.slice_mut(cb.bn.bias).copy_from_slice(&b);
                ds.params.slice_mut(cb.bn.weight).fill(1.0);
                ds.buffers.slice_mut(cb.bn.running_mean).fill(0.0);
                ds.buffers
                    .slice_mut(cb.bn.running_var)
                    .fill((1.0 - BN_EPS) as f32);
                for id in [cb.conv.weight, cb.bn.weight, cb.bn.bias] {
                    written_p[id.0] = true;
                }
                for id in [cb.bn.running_mean, cb.bn.running_var] {
                    written_b[id.0] = true;
                }
            }
            RepConv::Train { .. } => bail!("the deploy form holds a train-form conv"),
        }
    }
    // Everything else keeps its name.
    for (i, _) in written_p.iter().enumerate().filter(|(_, w)| !**w) {
        let name = ds.params.entry(Id(i)).name.clone();
        let Some(src) = ts.params.find(&name) else {
            bail!("deploy tensor {name} has no source in the train form")
        };
        ds.params
            .slice_mut(Id(i))
            .copy_from_slice(ts.params.slice(src));
    }
    for (i, _) in written_b.iter().enumerate().filter(|(_, w)| !**w) {
        let name = ds.buffers.entry(Id(i)).name.clone();
        let Some(src) = ts.buffers.find(&name) else {
            bail!("deploy buffer {name} has no source")
        };
        ds.buffers
            .slice_mut(Id(i))
            .copy_from_slice(ts.buffers.slice(src));
    }
    let counts: std::collections::HashMap<&str, i64> =
        ts.counters.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    for (name, c) in ds.counters.iter_mut() {
        *c = counts.get(name.as_str()).copied().unwrap_or(0);
    }
    Ok(())
}

/// How closely a folded model reproduces its train form (eval mode, on a given input).
#[derive(Clone, Copy, Debug)]
pub struct FoldCheck {
    /// The input's shape [N, 3, H, W].
    pub input: [usize; 4],
    /// max |y_deploy - y_train| over the logits.
    pub max_abs_err: f64,
    /// max |y_train|.
    pub max_abs_logit: f64,
    /// What float32 rounding alone moves the logits by: max |y(W') - y(W)| for the deploy
    /// weights W' = W (1 + d), d uniform in [-eps, eps] (eps = f32::EPSILON), largest of two draws.
    pub rounding: f64,
    /// The bound `max_abs_err` must stay within.
    pub tolerance: f64,
}

impl FoldCheck {
    /// True when the deploy form agrees within the tolerance (never for NaN).
    pub fn agrees(&self) -> bool {
        self.max_abs_err <= self.tolerance
    }
}

impl std::fmt::Display for FoldCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [n, c, h, w] = self.input;
        write!(
            f,
            "max abs err {:.2e}, tolerance {:.2e} ({ROUNDING_FACTOR} x the {:.2e} that float32 \
             rounding of the weights alone gives), max |logit| {:.2e} (rel err {:.2e}), on a \
             {n}x{c}x{h}x{w} input",
            self.max_abs_err,
            self.tolerance,
            self.rounding,
            self.max_abs_logit,
            self.max_abs_err / self.max_abs_logit.max(f64::MIN_POSITIVE),
        )
    }
}

/// The fold may differ from the train form by this many times what rounding every deploy weight
/// by up to one ulp does to the logits.
///
/// Why a measured bound: the fold is exact in real arithmetic, so the difference is float32
/// rounding only: of the folded weights (a sum of N+2 rounded products each, a few ulps) and of
/// both forms' evaluation (the train form sums N+2 branch convs, the deploy form one). How much
/// such errors grow by the logits depends on the network: its depth, and above all its weights
/// (a trained network's BN scales and the cancellation in its wide layers amplify them far more
/// than random weights do: a fixed relative bound of 1e-4 refused trained ghostnetv3_100 files at
/// 2.3e-4). Perturbing every deploy weight by a relative [-eps, eps] and measuring the change of
/// the logits measures that amplification for this very model and input; an evaluation's
/// rounding is of the same order per layer (a k-term dot product is off by about sqrt(k) eps of
/// its terms). A correct fold stays within 0.3 to 2 times it (measured on GhostNetV3 0.5x to
/// 1.6x at 64 and 128 px, ResNet-18 and MobileNetV2, with random and trained-like weights), so 16
/// leaves a margin of 8, while it still refuses one conv of the deploy form off by a relative
/// 1e-3 (tests/fold.rs); real fold bugs (a lost branch, a wrong BN eps) are off by far more.
pub const ROUNDING_FACTOR: f64 = 16.0;

/// Folds `train` and checks the deploy form against it on `x` [N, 3, H, W] in eval mode, before
/// anyone writes it (see [`check_fold`]). Host models only.
pub fn fold_checked(train: &mut Model, x: &Tensor<f32>) -> Result<(Model, FoldCheck)> {
    let mut deploy = fold(train)?;
    let check = check_fold(train, &mut deploy, x)?;
    Ok((deploy, check))
}

/// Checks a deploy form of `train` on `x`: an error (with the measured error and the tolerance)
/// when the folded weights hold a value no file of ours may hold (NaN, Inf, over
/// `MAX_ABS_WEIGHT`, a negative variance: the loader would refuse the file), when either form's
/// logits are not finite, or when they differ by more than the tolerance (see
/// [`ROUNDING_FACTOR`]). Host models only.
pub fn check_fold(train: &mut Model, deploy: &mut Model, x: &Tensor<f32>) -> Result<FoldCheck> {
    use crate::io::weights::implausible;
    use rand::{Rng, SeedableRng};
    // The first tensor of a state that the loader would refuse, and why.
    let first_implausible = |st: &crate::nn::State| {
        [&st.params, &st.buffers].into_iter().find_map(|store| {
            (0..store.len()).find_map(|i| {
                let name = &store.entry(Id(i)).name;
                implausible(name, store.slice(Id(i))).map(|why| format!("{name}: {why}"))
            })
        })
    };
    if let Some(bad) = first_implausible(deploy.state()) {
        let cause = match first_implausible(train.state()) {
            // (Said once where the tensor was copied as it is.)
            Some(t) if t != bad => format!(" (from the train form's {t})"),
            _ => String::new(),
        };
        bail!("the folded tensor {bad}{cause}: the train-form weights are broken");
    }
    let (yt, yd) = (train.predict(x), deploy.predict(x));
    for (y, form) in [(&yt, "train"), (&yd, "deploy")] {
        if let Some(i) = y.data().iter().position(|v| !v.is_finite()) {
            bail!(
                "the {form} form's logits are not finite ({} at element {i}): the weights are \
                 broken",
                y.data()[i]
            );
        }
    }
    let max_diff = |a: &Tensor<f32>, b: &Tensor<f32>| {
        a.data()
            .iter()
            .zip(b.data())
            .map(|(p, q)| (*p as f64 - *q as f64).abs())
            // NaN-propagating (f64::max would drop a NaN): a NaN is never within a tolerance.
            .fold(0.0f64, |m, d| {
                if d.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            })
    };
    // The rounding scale: the deploy form with every weight moved by up to one ulp (relative).
    let eps = f32::EPSILON;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let exact = deploy.state().params.flat().to_vec();
    let mut rounding = 0.0f64;
    for _ in 0..2 {
        let p = deploy.state_mut().params.flat_mut();
        for (w, &w0) in p.iter_mut().zip(&exact) {
            *w = w0 * (1.0 + rng.random_range(-eps..=eps));
        }
        let yp = deploy.predict(x);
        rounding = rounding.max(max_diff(&yp, &yd));
    }
    deploy.state_mut().params.flat_mut().copy_from_slice(&exact);
    let max_abs_logit = yt.data().iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let shape = x.shape();
    let check = FoldCheck {
        input: [shape[0], shape[1], shape[2], shape[3]],
        max_abs_err: max_diff(&yd, &yt),
        max_abs_logit,
        rounding,
        // The floor: logits that no weight moves (all weights zero, say) are still rounded.
        tolerance: (ROUNDING_FACTOR * rounding).max(4.0 * eps as f64 * max_abs_logit),
    };
    if !check.agrees() {
        bail!("the folded model disagrees with the train form: {check}; not trusting it");
    }
    Ok(check)
}

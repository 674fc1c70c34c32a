//! The fused re-parameterized depth-wise conv on the CPU (`backend/cpu/rep_conv.rs`) against the
//! composed branches (conv2d + batch_norm_train each, summed) on fresh random inputs: output,
//! every branch's batch statistics, every gradient; in f64 to 1e-10 and in f32 to rounding; and
//! its gradients against f64 finite differences. One test function: the fused switch is
//! process-wide.

use ghostv3::backend::cpu::rep_conv::set_fused;
use ghostv3::ops;
use ghostv3::tensor::storage::BatchStats;
use ghostv3::{Elem, Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

use common::{assert_runs_agree, rand_tensor, relu_like};

const EPS: f64 = 1e-5;

/// (n, c, h, w, k, stride, branches, scale, identity)
type Case = (usize, usize, usize, usize, usize, usize, usize, bool, bool);

const CASES: [Case; 11] = [
    (2, 36, 28, 28, 5, 2, 3, true, false),
    (2, 6, 28, 28, 5, 2, 3, true, false),
    (2, 28, 7, 7, 3, 1, 3, true, true),
    (2, 30, 14, 14, 3, 1, 3, true, true),
    (2, 3, 6, 5, 3, 1, 3, true, true),
    (3, 4, 7, 7, 3, 2, 3, true, false),
    (2, 2, 5, 6, 5, 1, 2, true, true),
    (2, 3, 9, 8, 5, 2, 1, true, false),
    (2, 2, 6, 6, 3, 1, 1, false, false),
    (1, 5, 4, 4, 3, 1, 4, false, true),
    (4, 2, 3, 3, 3, 2, 2, true, false),
];

struct Inputs<T: Elem> {
    x: Tensor<T>,
    kxk: Vec<Tensor<T>>,
    scale: Option<Tensor<T>>,
    bn: Vec<(Tensor<T>, Tensor<T>)>,
    gy: Tensor<T>,
}

fn inputs<T: Elem>(rng: &mut StdRng, c: &Case) -> Inputs<T> {
    let &(n, ch, h, w, k, s, nb, scale, id) = c;
    let nbt = nb + scale as usize + id as usize;
    let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
    Inputs {
        // An offset keeps the means away from zero, as activations are.
        x: rand_tensor(rng, &[n, ch, h, w], -1.0, 1.5),
        kxk: (0..nb)
            .map(|_| rand_tensor(rng, &[ch, 1, k, k], -1.0, 1.0))
            .collect(),
        scale: scale.then(|| rand_tensor(rng, &[ch, 1, 1, 1], -1.0, 1.0)),
        bn: (0..nbt)
            .map(|_| {
                (
                    rand_tensor(rng, &[ch], 0.5, 1.5),
                    rand_tensor(rng, &[ch], -0.5, 0.5),
                )
            })
            .collect(),
        gy: rand_tensor(rng, &[n, ch, ho, wo], -1.0, 1.0),
    }
}

/// y, the statistics, every gradient (x, kxk..., scale, gammas..., betas...) and the ops run.
type Run = (Vec<f64>, Vec<BatchStats>, Vec<Vec<f64>>, Vec<&'static str>);

/// Picks one input tensor to perturb.
type Pick = Box<dyn Fn(&mut Inputs<f64>) -> &mut Tensor<f64>>;

/// y, the statistics and every gradient (x, kxk..., scale, gammas..., betas...), fused or not.
fn run<T: Elem>(inp: &Inputs<T>, c: &Case, fused: bool) -> Run {
    set_fused(fused);
    let mut tape = Tape::<T>::new();
    tape.enable_profile();
    let x = tape.leaf(inp.x.clone(), true);
    let kxk: Vec<Var> = inp.kxk.iter().map(|t| tape.leaf(t.clone(), true)).collect();
    let scale = inp.scale.as_ref().map(|t| tape.leaf(t.clone(), true));
    let bn: Vec<(Var, Var)> = inp
        .bn
        .iter()
        .map(|(g, b)| (tape.leaf(g.clone(), true), tape.leaf(b.clone(), true)))
        .collect();
    let (y, stats) = ops::rep_conv_dw(&mut tape, x, &kxk, scale, c.8, &bn, c.5, EPS);
    let ops_run: Vec<&'static str> = tape.profile().unwrap().ops.keys().copied().collect();
    let yv = tape.value(y).data().iter().map(|v| v.as_f64()).collect();
    let g = tape.backward_with(y, inp.gy.clone());
    let mut vars = vec![x];
    vars.extend(&kxk);
    vars.extend(scale);
    vars.extend(bn.iter().map(|p| p.0));
    vars.extend(bn.iter().map(|p| p.1));
    let grads = vars
        .iter()
        .map(|&v| {
            g.get(v)
                .unwrap()
                .data()
                .iter()
                .map(|v| v.as_f64())
                .collect()
        })
        .collect();
    set_fused(true);
    (yv, stats, grads, ops_run)
}

fn compare<T: Elem>(seed: u64, tol: f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (i, c) in CASES.iter().enumerate() {
        let mut inp = inputs::<T>(&mut rng, c);
        if i % 2 == 1 {
            inp.x = relu_like(&inp.x);
        }
        let (yf, sf, gf, opsf) = run(&inp, c, true);
        let (yc, sc, gc, opsc) = run(&inp, c, false);
        let case = format!("{c:?} {:?}", T::DTYPE);
        assert_eq!(opsf, ["rep_conv_dw"], "{case}: the fused op ran");
        assert!(
            opsc.contains(&"batch_norm_train"),
            "{case}: composed {opsc:?}"
        );
        assert_runs_agree(&case, (&yf, &sf, &gf), (&yc, &sc, &gc), tol);
    }
}

/// Central differences of L = sum(gy * y) at a few coordinates of every input, f64.
fn finite_differences() {
    let mut rng = StdRng::seed_from_u64(77);
    for c in &CASES[..4] {
        let inp = inputs::<f64>(&mut rng, c);
        let (_, _, grads, _) = run(&inp, c, true);
        let loss = |inp: &Inputs<f64>| {
            let (y, _) = run_forward(inp, c);
            y.iter().zip(inp.gy.data()).map(|(a, b)| a * b).sum::<f64>()
        };
        let h = 1e-6;
        let mut tensors: Vec<Pick> = vec![Box::new(|i| &mut i.x)];
        for b in 0..inp.kxk.len() {
            tensors.push(Box::new(move |i| &mut i.kxk[b]));
        }
        if inp.scale.is_some() {
            tensors.push(Box::new(|i| i.scale.as_mut().unwrap()));
        }
        for b in 0..inp.bn.len() {
            tensors.push(Box::new(move |i| &mut i.bn[b].0));
        }
        for b in 0..inp.bn.len() {
            tensors.push(Box::new(move |i| &mut i.bn[b].1));
        }
        assert_eq!(tensors.len(), grads.len());
        for (ti, pick) in tensors.iter().enumerate() {
            let mut probe = Inputs {
                x: inp.x.clone(),
                kxk: inp.kxk.clone(),
                scale: inp.scale.clone(),
                bn: inp.bn.clone(),
                gy: inp.gy.clone(),
            };
            let len = pick(&mut probe).data().len();
            for _ in 0..4 {
                let j = rng.random_range(0..len);
                let at = |probe: &mut Inputs<f64>, d: f64| {
                    let t = pick(probe);
                    let mut v = t.data().to_vec();
                    v[j] += d;
                    *t = Tensor::new(t.shape(), v);
                };
                at(&mut probe, h);
                let up = loss(&probe);
                at(&mut probe, -2.0 * h);
                let down = loss(&probe);
                at(&mut probe, h);
                let fd = (up - down) / (2.0 * h);
                let an = grads[ti][j];
                assert!(
                    (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
                    "{c:?} input {ti}[{j}]: analytic {an}, finite differences {fd}"
                );
            }
        }
    }
}

fn run_forward(inp: &Inputs<f64>, c: &Case) -> (Vec<f64>, Vec<BatchStats>) {
    let mut tape = Tape::<f64>::new();
    let x = tape.leaf(inp.x.clone(), false);
    let kxk: Vec<Var> = inp
        .kxk
        .iter()
        .map(|t| tape.leaf(t.clone(), false))
        .collect();
    let scale = inp.scale.as_ref().map(|t| tape.leaf(t.clone(), false));
    let bn: Vec<(Var, Var)> = inp
        .bn
        .iter()
        .map(|(g, b)| (tape.leaf(g.clone(), false), tape.leaf(b.clone(), false)))
        .collect();
    let (y, stats) = ops::rep_conv_dw(&mut tape, x, &kxk, scale, c.8, &bn, c.5, EPS);
    (tape.value(y).data().to_vec(), stats)
}

#[test]
fn fused_rep_dw_on_the_cpu_equals_the_composed_branches() {
    compare::<f64>(5, 1e-10);
    compare::<f32>(6, 1e-4);
    finite_differences();
    whole_model_step_fused_equals_composed();
}

/// A whole GhostNetV3 train-form step (forward, cross-entropy, backward) with the fused
/// depth-wise convs against the composed branches: every parameter gradient.
fn whole_model_step_fused_equals_composed() {
    use ghostv3::models::{self, ModelOptions};
    use ghostv3::nn::{Mode, RepOptions};
    let opts = ModelOptions {
        num_classes: 10,
        rep: RepOptions {
            branches: 3,
            scale: true,
            identity: true,
        },
        deploy: false,
        drop_rate: 0.0,
        seed: 3,
    };
    let mut rng = StdRng::seed_from_u64(9);
    let x: Tensor<f32> = rand_tensor(&mut rng, &[2, 3, 112, 112], -1.0, 1.0);
    let step = |fused: bool| {
        set_fused(fused);
        let mut m = models::create("ghostnetv3_050", &opts).unwrap();
        // Random BN affine and running statistics, as a trained network has (gamma = 1,
        // beta = 0 everywhere would leave terms untested).
        common::randomize_bn(m.state_mut(), &mut StdRng::seed_from_u64(4), 3.0);
        let mut tape = Tape::new();
        let xv = tape.constant(x.clone());
        let (logits, leaves) = m.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
        let loss = ops::cross_entropy(&mut tape, logits, &[1, 7], 0.0);
        let g = tape.backward(loss);
        let flat = leaves.flat_grads(m.state(), &g).into_vec();
        set_fused(true);
        (m.state().params.entries().to_vec(), flat)
    };
    let (entries, gf) = step(true);
    let (_, gc) = step(false);
    // Gradients that vanish in exact arithmetic (the 1x1 scale weights': BN undoes the scale)
    // are compared at a thousandth of the largest.
    let bad = common::differing_grads(&entries, &gf, &gc);
    assert!(
        bad.is_empty(),
        "fused and composed gradients differ:\n{}",
        bad.join("\n")
    );
}

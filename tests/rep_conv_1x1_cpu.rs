//! The fused re-parameterized 1x1 conv on the CPU (`backend/cpu/rep_conv_1x1.rs`: one folded
//! conv from the input's mean and covariance) against the composed branches (1x1 conv2d +
//! batch_norm_train each, the BN identity, summed) on fresh random inputs: output, every
//! branch's batch statistics, every gradient; in f64 to 1e-10 and in f32 to rounding; its
//! gradients against f64 finite differences; and a whole train-form step. One test function:
//! the fused switch is process-wide.

use ghostv3::backend::cpu::rep_conv_1x1::set_fused_1x1;
use ghostv3::ops;
use ghostv3::tensor::storage::BatchStats;
use ghostv3::{Elem, Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

use common::{assert_runs_agree, rand_tensor, relu_like};

const EPS: f64 = 1e-5;

/// (n, cin, cout, h, w, branches, identity, input offset)
type Case = (usize, usize, usize, usize, usize, usize, bool, f64);

const CASES: [Case; 8] = [
    (2, 6, 6, 5, 7, 3, true, 0.0),
    (3, 5, 9, 7, 3, 1, false, 0.0),
    (1, 12, 12, 9, 11, 2, true, 0.0),
    (2, 10, 7, 6, 6, 3, false, 0.0),
    // More samples than partial sums (8): later samples accumulate into them.
    (10, 6, 6, 3, 3, 2, true, 0.0),
    (19, 4, 6, 3, 3, 2, false, 0.0),
    (2, 40, 60, 14, 14, 3, false, 0.5),
    // A mean 10x the spread: the covariance must come from the centred input.
    (3, 7, 5, 5, 5, 2, false, 6.0),
];

struct Inputs<T: Elem> {
    x: Tensor<T>,
    w: Vec<Tensor<T>>,
    bn: Vec<(Tensor<T>, Tensor<T>)>,
    gy: Tensor<T>,
}

fn inputs<T: Elem>(rng: &mut StdRng, c: &Case) -> Inputs<T> {
    let &(n, cin, cout, h, w, nb, id, off) = c;
    Inputs {
        x: rand_tensor(rng, &[n, cin, h, w], off - 1.0, off + 1.0),
        w: (0..nb)
            .map(|_| rand_tensor(rng, &[cout, cin, 1, 1], -0.5, 0.5))
            .collect(),
        bn: (0..nb + id as usize)
            .map(|_| {
                (
                    rand_tensor(rng, &[cout], 0.5, 1.5),
                    rand_tensor(rng, &[cout], -0.5, 0.5),
                )
            })
            .collect(),
        gy: rand_tensor(rng, &[n, cout, h, w], -1.0, 1.0),
    }
}

/// y, the statistics, every gradient (x, weights..., gammas..., betas...) and the ops run.
type Run = (Vec<f64>, Vec<BatchStats>, Vec<Vec<f64>>, Vec<&'static str>);

fn run<T: Elem>(inp: &Inputs<T>, c: &Case, fused: bool) -> Run {
    set_fused_1x1(fused);
    let mut tape = Tape::<T>::new();
    tape.enable_profile();
    let x = tape.leaf(inp.x.clone(), true);
    let w: Vec<Var> = inp.w.iter().map(|t| tape.leaf(t.clone(), true)).collect();
    let bn: Vec<(Var, Var)> = inp
        .bn
        .iter()
        .map(|(g, b)| (tape.leaf(g.clone(), true), tape.leaf(b.clone(), true)))
        .collect();
    let (y, stats) = ops::rep_conv_1x1(&mut tape, x, &w, c.6, &bn, EPS);
    let ops_run: Vec<&'static str> = tape.profile().unwrap().ops.keys().copied().collect();
    let yv = tape.value(y).data().iter().map(|v| v.as_f64()).collect();
    let g = tape.backward_with(y, inp.gy.clone());
    let mut vars = vec![x];
    vars.extend(&w);
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
    set_fused_1x1(true);
    (yv, stats, grads, ops_run)
}

fn compare<T: Elem>(seed: u64, tol: f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (i, c) in CASES.iter().enumerate() {
        let mut inp = inputs::<T>(&mut rng, c);
        if i % 2 == 1 && c.7 == 0.0 {
            inp.x = relu_like(&inp.x);
        }
        let (yf, sf, gf, opsf) = run(&inp, c, true);
        let (yc, sc, gc, opsc) = run(&inp, c, false);
        let case = format!("{c:?} {:?}", T::DTYPE);
        assert_eq!(opsf, ["rep_conv_1x1"], "{case}: the fused op ran");
        assert!(
            opsc.contains(&"batch_norm_train"),
            "{case}: composed {opsc:?}"
        );
        assert_runs_agree(&case, (&yf, &sf, &gf), (&yc, &sc, &gc), tol);
    }
}

/// Picks one input tensor to perturb.
type Pick = Box<dyn Fn(&mut Inputs<f64>) -> &mut Tensor<f64>>;

/// Central differences of L = sum(gy * y) at a few coordinates of every input, f64.
fn finite_differences() {
    let mut rng = StdRng::seed_from_u64(78);
    for c in &CASES[..4] {
        let inp = inputs::<f64>(&mut rng, c);
        let (_, _, grads, _) = run(&inp, c, true);
        let loss = |inp: &Inputs<f64>| {
            let mut tape = Tape::<f64>::new();
            let x = tape.leaf(inp.x.clone(), false);
            let w: Vec<Var> = inp.w.iter().map(|t| tape.leaf(t.clone(), false)).collect();
            let bn: Vec<(Var, Var)> = inp
                .bn
                .iter()
                .map(|(g, b)| (tape.leaf(g.clone(), false), tape.leaf(b.clone(), false)))
                .collect();
            let (y, _) = ops::rep_conv_1x1(&mut tape, x, &w, c.6, &bn, EPS);
            let y = tape.value(y).data().to_vec();
            y.iter().zip(inp.gy.data()).map(|(a, b)| a * b).sum::<f64>()
        };
        let h = 1e-6;
        let mut tensors: Vec<Pick> = vec![Box::new(|i| &mut i.x)];
        for b in 0..inp.w.len() {
            tensors.push(Box::new(move |i| &mut i.w[b]));
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
                w: inp.w.clone(),
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

/// A whole GhostNetV3 train-form step (forward, cross-entropy, backward) with the fused 1x1
/// convs (where the cost estimate picks them) against the composed branches: every parameter
/// gradient, and that some 1x1 convs did run fused.
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
    let x: Tensor<f32> = rand_tensor(&mut rng, &[4, 3, 64, 64], -1.0, 1.0);
    let step = |fused: bool| {
        set_fused_1x1(fused);
        let mut m = models::create("ghostnetv3_050", &opts).unwrap();
        common::randomize_bn(m.state_mut(), &mut StdRng::seed_from_u64(4), 3.0);
        let mut tape = Tape::new();
        tape.enable_profile();
        let xv = tape.constant(x.clone());
        let (logits, leaves) = m.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
        let loss = ops::cross_entropy(&mut tape, logits, &[1, 7, 3, 0], 0.0);
        let fused_ops = tape.profile().unwrap().ops.get("rep_conv_1x1").map(|o| o.0);
        let g = tape.backward(loss);
        let flat = leaves.flat_grads(m.state(), &g).into_vec();
        set_fused_1x1(true);
        (m.state().params.entries().to_vec(), flat, fused_ops)
    };
    let (entries, gf, nf) = step(true);
    let (_, gc, nc) = step(false);
    assert!(nf.unwrap_or(0) > 0, "no 1x1 conv ran fused");
    assert!(nc.is_none(), "the composed run fused {nc:?}");
    let bad = common::differing_grads(&entries, &gf, &gc);
    assert!(
        bad.is_empty(),
        "fused and composed gradients differ:\n{}",
        bad.join("\n")
    );
}

#[test]
fn fused_rep_1x1_on_the_cpu_equals_the_composed_branches() {
    compare::<f64>(5, 1e-10);
    compare::<f32>(6, 1e-4);
    finite_differences();
    whole_model_step_fused_equals_composed();
}

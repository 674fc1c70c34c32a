//! Folding (re-parameterization) is exact: at every width and for every branch option, the deploy
//! form in eval mode gives the train form's eval outputs up to float rounding. Weights and BN
//! statistics are random and non-trivial (as in make_fixture.py), so every branch matters.

mod common;

use common::randomize_bn;
use ghostv3::models::{self, Model, ModelOptions};
use ghostv3::nn::RepOptions;
use ghostv3::{reparam, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn random_input(rng: &mut StdRng, n: usize, size: usize) -> Tensor<f32> {
    Tensor::new(
        &[n, 3, size, size],
        (0..n * 3 * size * size)
            .map(|_| StandardNormal.sample(rng))
            .collect(),
    )
}

fn check(name: &str, rep: RepOptions, size: usize, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let opts = ModelOptions {
        num_classes: 10,
        rep,
        seed,
        ..Default::default()
    };
    let mut train = models::create(name, &opts).unwrap();
    let gain = if rep.branches > 3 {
        (rep.branches + 2) as f32 / 3.0
    } else {
        1.0
    };
    randomize_bn(train.state_mut(), &mut rng, gain);
    let mut deploy = reparam::fold(&train).unwrap();
    assert!(deploy.is_deploy());
    let x = random_input(&mut rng, 2, size);
    let (yt, yd) = (train.predict(&x), deploy.predict(&x));
    let rel = yd.max_abs_diff(&yt) / yt.max_abs();
    println!("{name} {rep:?} at {size}: folded vs train form eval logits, max rel err {rel:.2e} (max abs logit {:.2e})", yt.max_abs());
    assert!(yt.max_abs() > 1e-3, "degenerate logits");
    assert!(
        rel <= 1e-5,
        "{name} {rep:?}: fold changes the outputs by {rel:.2e}"
    );
    rel
}

#[test]
fn fold_is_exact_at_every_width() {
    for (i, (name, _)) in models::GHOSTNETV3.into_iter().enumerate() {
        check(name, RepOptions::default(), 67, i as u64);
    }
}

#[test]
fn fold_is_exact_for_every_branch_option() {
    for branches in 1..=5 {
        for (scale, identity) in [(true, true), (false, true), (true, false), (false, false)] {
            check(
                "ghostnetv3_050",
                RepOptions {
                    branches,
                    scale,
                    identity,
                },
                64,
                branches as u64,
            );
        }
    }
}

/// GhostNetV3 0.5x built in its deploy form (default options otherwise).
fn deploy_ghostnetv3_050() -> Model {
    let opts = ModelOptions {
        deploy: true,
        ..Default::default()
    };
    models::create("ghostnetv3_050", &opts).unwrap()
}

/// The names and shapes of a model's parameters, in order.
fn param_shapes(m: &Model) -> Vec<(&String, &Vec<usize>)> {
    m.state()
        .params
        .entries()
        .iter()
        .map(|e| (&e.name, &e.shape))
        .collect()
}

#[test]
fn fold_keeps_shapes_of_the_plain_network() {
    // Whatever the training branches, the deploy form is the same network: same tensors, shapes.
    let plain = deploy_ghostnetv3_050();
    for rep in [
        RepOptions::default(),
        RepOptions::none(),
        RepOptions {
            branches: 5,
            scale: true,
            identity: false,
        },
    ] {
        let train = models::create(
            "ghostnetv3_050",
            &ModelOptions {
                rep,
                ..Default::default()
            },
        )
        .unwrap();
        let folded = reparam::fold(&train).unwrap();
        assert_eq!(param_shapes(&folded), param_shapes(&plain), "{rep:?}");
    }
}

#[test]
fn folding_a_deploy_model_is_an_error() {
    let d = deploy_ghostnetv3_050();
    let e = format!("{:#}", reparam::fold(&d).err().unwrap());
    assert!(e.contains("already in deploy"), "{e}");
}

/// The other models with `rep_branches = 3` (+ scale and identity branches where shapes allow):
/// folding gives their plain timm/torchvision network (same names and shapes) with the train
/// form's eval outputs, and the folded file loads into the plain model and gives them again.
#[test]
fn other_models_fold_into_their_plain_form() {
    let dir = std::env::temp_dir().join(format!("ghostv3-fold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, name) in [
        "mobilenetv2_100",
        "shufflenet_v2_x1_0",
        "ghostnet_100",
        "ghostnetv2_100",
        "resnet18",
        "resnet50",
    ]
    .into_iter()
    .enumerate()
    {
        let t0 = std::time::Instant::now();
        let seed = 100 + i as u64;
        let rel = check(name, RepOptions::default(), 64, seed);
        // The same train model again (check() drew it from the same seeds), folded and saved.
        let mut rng = StdRng::seed_from_u64(seed);
        let opts = ModelOptions {
            num_classes: 10,
            seed,
            ..Default::default()
        };
        let mut train = models::create(name, &opts).unwrap();
        assert!(!train.is_deploy(), "{name}: built without branches");
        randomize_bn(train.state_mut(), &mut rng, 1.0);
        let mut folded = reparam::fold(&train).unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        ghostv3::io::save_state(folded.state(), &path, Default::default()).unwrap();
        let mut plain = models::create(
            name,
            &ModelOptions {
                deploy: true,
                ..opts
            },
        )
        .unwrap();
        assert!(plain.is_deploy() && plain.form() == "plain form");
        let names = |m: &Model| -> Vec<(String, Vec<usize>)> {
            let s = m.state();
            s.params
                .entries()
                .iter()
                .chain(s.buffers.entries())
                .map(|e| (e.name.clone(), e.shape.clone()))
                .collect()
        };
        assert_eq!(names(&folded), names(&plain), "{name}: folded tensors");
        ghostv3::io::load_state(plain.state_mut(), &path).unwrap();
        // Nothing to fold in the plain model: the file is complete and the model usable as is.
        assert!(ghostv3::models::detect_options(&path).unwrap().deploy);
        let x = random_input(&mut rng, 2, 64);
        let (yf, yp) = (folded.predict(&x), plain.predict(&x));
        assert_eq!(yf.data(), yp.data(), "{name}: reloaded plain model differs");
        let params = |m: &Model| m.state().params.numel();
        println!(
            "{name}: train form {} params -> plain {} params, fold rel err {rel:.2e}, {:.1} s",
            params(&train),
            params(&plain),
            t0.elapsed().as_secs_f64()
        );
    }
}

//! The trainer end to end on the built-in synthetic set: exact resume, config errors that name
//! the key, and a NaN loss that stops the run without touching the last good checkpoint.

use ghostv3::train::config::TrainConfig;
use ghostv3::train::{Trainer, CHECKPOINT};
use std::path::PathBuf;

/// A tiny recipe: 64 images of 64x64, batch 32, GhostNetV3-0.5x with N=2 branches.
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "data.synthetic_train=64",
        "data.synthetic_val=32",
        "data.workers=2",
        "train.epochs=2",
        "schedule.epochs=2",
        "train.batch_size=32",
        "train.eval_batch_size=32",
        "model.rep_branches=2",
        "model.drop_rate=0.2",
        "augment.auto_augment=\"rand-m9-mstd0.5\"",
        "augment.re_prob=0.25",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::from_toml(TrainConfig::default_recipe(), &sets, "test").unwrap()
}

fn run_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn two_epochs_equal_one_plus_resume_one() {
    let (a, b) = (run_dir("straight"), run_dir("resumed"));
    let mut t = Trainer::new(tiny(&[]), &a).unwrap();
    t.quiet = true;
    let summary = t.run().unwrap();
    assert_eq!(summary.epochs.len(), 2);
    let straight = (
        t.model.state().params.flat().to_vec(),
        t.model.state().buffers.flat().to_vec(),
    );

    let mut t1 = Trainer::new(tiny(&[]), &b).unwrap();
    t1.quiet = true;
    t1.run_epoch().unwrap();
    drop(t1);
    let mut t2 = Trainer::resume(&b, &[]).unwrap();
    t2.quiet = true;
    assert_eq!(t2.epoch, 1);
    t2.run().unwrap();
    let resumed = (
        t2.model.state().params.flat().to_vec(),
        t2.model.state().buffers.flat().to_vec(),
    );
    assert!(straight.0 == resumed.0, "parameters differ after resume");
    assert!(straight.1 == resumed.1, "BN buffers differ after resume");
    // Both runs logged two epochs, wrote best/last/deploy weights.
    for d in [&a, &b] {
        let lines = std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert_eq!(lines, 2);
        for f in [
            "best.safetensors",
            "last.safetensors",
            "deploy.safetensors",
            CHECKPOINT,
            "config.toml",
        ] {
            assert!(d.join(f).is_file(), "{f} missing in {}", d.display());
        }
    }
}

#[test]
fn config_errors_name_the_key() {
    let e = format!(
        "{:#}",
        TrainConfig::from_toml(
            TrainConfig::default_recipe(),
            &["train.lrr=0.1".into()],
            "x"
        )
        .unwrap_err()
    );
    assert!(e.contains("lrr"), "{e}");
    let e = format!(
        "{:#}",
        TrainConfig::from_toml(
            TrainConfig::default_recipe(),
            &["train.epochs=\"five\"".into()],
            "x"
        )
        .unwrap_err()
    );
    assert!(e.contains("epochs"), "{e}");
    let e = format!(
        "{:#}",
        TrainConfig::from_toml("[modle]\nname = \"x\"", &[], "x").unwrap_err()
    );
    assert!(e.contains("modle"), "{e}");
    let e = format!(
        "{:#}",
        TrainConfig::from_toml(
            TrainConfig::default_recipe(),
            &["optimizer.kind=\"adam\"".into()],
            "x"
        )
        .unwrap_err()
    );
    assert!(e.contains("adam"), "{e}");
}

#[test]
fn a_new_run_refuses_a_directory_that_holds_one() {
    let d = run_dir("twice");
    let mut t = Trainer::new(tiny(&["train.epochs=1", "schedule.epochs=1"]), &d).unwrap();
    t.quiet = true;
    t.run().unwrap();
    let e = Trainer::new(tiny(&[]), &d)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let d = run_dir("nan");
    let mut t = Trainer::new(tiny(&[]), &d).unwrap();
    t.quiet = true;
    t.run_epoch().unwrap();
    drop(t);
    let before = std::fs::read(d.join(CHECKPOINT)).unwrap();
    let mut t = Trainer::resume(
        &d,
        &["train.lr=1e30".into(), "optimizer.max_grad_norm=0".into()],
    )
    .unwrap();
    t.quiet = true;
    let e = format!("{:#}", t.run().unwrap_err());
    assert!(
        e.contains("loss became") && e.contains("last good checkpoint"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(d.join(CHECKPOINT)).unwrap(),
        before,
        "checkpoint changed"
    );
}

#[test]
fn shipped_recipes_parse() {
    for f in [
        "configs/synthetic_quick.toml",
        "configs/imagenette_cpu.toml",
        "configs/ghostnetv3_100_imagenet.toml",
        "configs/mobilenetv2_100_imagenet.toml",
        "configs/shufflenet_v2_x1_0_imagenet.toml",
    ] {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let cfg = TrainConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        assert!(cfg.train.epochs > 0);
    }
}

/// Knowledge distillation is wired: the teacher (loaded from a file, eval mode, no gradient)
/// changes the loss with alpha, and its weights file is untouched by training.
#[test]
fn kd_term_changes_the_loss_and_leaves_the_teacher_alone() {
    use ghostv3::models::{create, ModelOptions};
    let dir = run_dir("kd");
    std::fs::create_dir_all(&dir).unwrap();
    let teacher = create(
        "ghostnetv3_050",
        &ModelOptions {
            num_classes: 10,
            seed: 9,
            ..Default::default()
        },
    )
    .unwrap();
    let tw = dir.join("teacher.safetensors");
    ghostv3::io::save_state(teacher.state(), &tw, Default::default()).unwrap();
    let before = std::fs::read(&tw).unwrap();
    let mut losses = Vec::new();
    for alpha in ["0.0", "1.0"] {
        let sets = [
            "train.epochs=1",
            "schedule.epochs=1",
            "kd.teacher=\"ghostnetv3_050\"",
            &format!("kd.teacher_weights=\"{}\"", tw.display()),
            &format!("kd.alpha={alpha}"),
            "kd.temperature=2.0",
        ];
        let mut t = Trainer::new(tiny(&sets), &dir.join(format!("run-{alpha}"))).unwrap();
        t.quiet = true;
        losses.push(t.run().unwrap().epochs[0].train_loss);
    }
    println!(
        "train loss with alpha 0: {}, alpha 1: {}",
        losses[0], losses[1]
    );
    assert!(
        (losses[0] - losses[1]).abs() > 1e-3,
        "KD weight has no effect: {losses:?}"
    );
    assert_eq!(
        std::fs::read(&tw).unwrap(),
        before,
        "teacher weights changed"
    );
}

/// KD with a ResNet-18 teacher (the paper compares teachers, Table 3): the student (GhostNetV3)
/// loss changes with alpha, the teacher runs in eval mode without gradients (its parameters, BN
/// statistics and batch counters are untouched in memory) and its weights file is unchanged.
#[test]
fn kd_with_a_resnet18_teacher() {
    use ghostv3::models::{create, ModelOptions};
    let dir = run_dir("kd-resnet");
    std::fs::create_dir_all(&dir).unwrap();
    let teacher = create(
        "resnet18",
        &ModelOptions {
            num_classes: 10,
            deploy: true,
            seed: 11,
            ..Default::default()
        },
    )
    .unwrap();
    let tw = dir.join("resnet18.safetensors");
    ghostv3::io::save_state(teacher.state(), &tw, Default::default()).unwrap();
    let before = std::fs::read(&tw).unwrap();
    let mut losses = Vec::new();
    for alpha in ["0.0", "0.5", "1.0"] {
        let sets = [
            "train.epochs=1",
            "schedule.epochs=1",
            "kd.teacher=\"resnet18\"",
            &format!("kd.teacher_weights=\"{}\"", tw.display()),
            &format!("kd.alpha={alpha}"),
            "kd.temperature=1.0",
        ];
        let mut t = Trainer::new(tiny(&sets), &dir.join(format!("run-{alpha}"))).unwrap();
        t.quiet = true;
        losses.push(t.run().unwrap().epochs[0].train_loss);
        let tm = t.teacher().expect("teacher loaded");
        assert_eq!(tm.name(), "resnet18");
        assert!(
            tm.state().params.flat() == teacher.state().params.flat()
                && tm.state().buffers.flat() == teacher.state().buffers.flat(),
            "teacher state changed in training"
        );
        assert!(tm.state().counters.iter().all(|(_, c)| *c == 0));
    }
    println!("train loss with a resnet18 teacher, alpha 0 / 0.5 / 1: {losses:?}");
    assert!(
        (losses[0] - losses[2]).abs() > 1e-3 && (losses[1] - losses[2]).abs() > 1e-4,
        "KD weight has no effect: {losses:?}"
    );
    assert_eq!(
        std::fs::read(&tw).unwrap(),
        before,
        "teacher weights changed"
    );
}

/// `train.accum_steps = 2`: the trainer's epoch equals a replay by hand of what accumulation
/// means: forward/backward of each loader micro-batch (own BN statistics), the mean of each
/// pair's flat gradients, one optimizer step per pair at the lr of the pair's first
/// micro-batch. Bit for bit. And it differs from the run without accumulation.
#[test]
fn accum_steps_average_micro_batches_into_one_optimizer_step() {
    use ghostv3::train::step;
    // 64 images in micro-batches of 16: 4 micro-batches, 2 optimizer steps per epoch.
    let extra = [
        "train.epochs=1",
        "schedule.epochs=1",
        "train.batch_size=16",
        "model.drop_rate=0",
    ];
    let cfg = |k: &str| {
        let mut e: Vec<&str> = extra.to_vec();
        e.push(k);
        tiny(&e)
    };
    let mut t = Trainer::new(cfg("train.accum_steps=2"), &run_dir("accum")).unwrap();
    t.quiet = true;
    t.run_epoch().unwrap().unwrap();
    let trained = t.model.state().params.flat().to_vec();

    let mut r = Trainer::new(cfg("train.accum_steps=2"), &run_dir("accum-replay")).unwrap();
    let batches: Vec<_> = r
        .train_loader()
        .epoch(0)
        .collect::<anyhow::Result<_>>()
        .unwrap();
    assert_eq!(batches.len(), 4);
    let (classes, smoothing) = (r.model.num_classes(), r.cfg.train.label_smoothing);
    let mut grads = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let q = ghostv3::data::mixup::one_hot_smoothed(&b.labels, classes, smoothing);
        let loss = step::Loss::ce(step::Targets::Soft(&q));
        let out = step::forward_backward(&mut r.model, &b.images, loss, true, None).unwrap();
        grads.push(out.grads.unwrap());
        if i % 2 == 1 {
            let mean = grads[0].add(&grads[1]).scale(0.5);
            grads.clear();
            let lr = r.cfg.schedule.lr_at(r.cfg.train.lr, (i - 1) as f64 / 4.0);
            step::apply(&mut r.model, &mut r.update, &mean, lr).unwrap();
        }
    }
    let replayed = r.model.state().params.flat().to_vec();
    assert!(
        trained == replayed,
        "accum_steps=2 is not the mean of micro-batch gradients"
    );

    let mut u = Trainer::new(cfg("train.accum_steps=1"), &run_dir("no-accum")).unwrap();
    u.quiet = true;
    u.run_epoch().unwrap().unwrap();
    let max_diff = trained
        .iter()
        .zip(u.model.state().params.flat())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff > 1e-6, "accumulation changed nothing ({max_diff})");
}

/// With accumulation a stop waits for the end of the optimizer step (partial gradients are not
/// checkpointed), and resuming from there gives the uninterrupted run bit for bit.
#[test]
fn accum_steps_stop_at_a_step_boundary_and_resume_exactly() {
    use ghostv3::train::preempt::StopFlag;
    let cfg = || tiny(&["train.batch_size=16", "train.accum_steps=3"]);
    let mut t = Trainer::new(cfg(), &run_dir("accum-straight")).unwrap();
    t.quiet = true;
    t.run().unwrap();
    let straight = t.model.state().params.flat().to_vec();

    let b = run_dir("accum-stopped");
    let mut t = Trainer::new(cfg(), &b).unwrap();
    t.quiet = true;
    let flag = StopFlag::new();
    t.stop_on(flag.clone());
    t.run_epoch()
        .unwrap()
        .unwrap_or_else(|| panic!("stopped early"));
    flag.request(signal_hook::consts::SIGTERM);
    // Epoch 2: micro-batches 0, 1, 2 make its first optimizer step; the stop waits for them.
    assert!(t.run_epoch().unwrap().is_none());
    drop(t);
    let mut t = Trainer::resume(&b, &[]).unwrap();
    t.quiet = true;
    assert_eq!(t.resumed_at(), Some("at epoch 2 step 3"));
    t.run().unwrap();
    assert!(
        t.model.state().params.flat().to_vec() == straight,
        "the resumed run differs"
    );
}

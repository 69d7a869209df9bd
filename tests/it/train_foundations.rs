//! Training foundations: AdamW against torch.optim.AdamW, its checkpointed state, gradient
//! clipping against torch's clip_grad_norm_, and the learning-rate schedules.

// The torch reference values are printed as the shortest f64 repr of each f32, exactly.
#![allow(clippy::excessive_precision)]

use dfdx::prelude::*;
use sdpipe::train::lr::{A1111Schedule, LrError, LrSchedule};
use sdpipe::train::optim::{AdamW, AdamWConfig, clip_coefficient, clip_grad_norm, grad_norm};

/// Gradients and learning rates of the 4 steps; the reference values below are what
/// torch 2.15 (CPU, f32) gives for
/// ```python
/// p = Parameter(tensor([[0.5, -1.25, 2.0], [0.0, 3.5, -0.75]]))
/// q = Parameter(tensor([0.1, -0.2, 0.3, 0.4]).reshape(1, 1, 2, 2))
/// opt = torch.optim.AdamW([p, q], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
/// for s in range(4):
///     for g in opt.param_groups: g["lr"] = LRS[s]
///     p.grad, q.grad = GP[s], GQ[s]; opt.step()
/// ```
const GP: [[f32; 6]; 4] = [
    [0.1, -0.2, 0.3, 1e-4, -5.0, 0.0],
    [-0.3, 0.1, 0.2, 2e-4, 4.0, 1e-9],
    [0.05, 0.05, -0.5, 0.0, -3.0, 0.5],
    [1.0, -1.0, 0.25, -1e-3, 2.0, -0.5],
];
const GQ: [[f32; 4]; 4] = [
    [0.2, 0.0, -0.1, 0.7],
    [-0.2, 0.1, 0.1, -0.7],
    [0.3, 0.3, 0.3, 0.3],
    [0.0, -0.4, 0.2, 0.1],
];
const LRS: [f64; 4] = [1e-3, 2e-3, 5e-4, 1e-3];
const TORCH_P: [[f32; 6]; 4] = [
    [
        0.49899500608444214,
        -1.2489874362945557,
        1.998979926109314,
        -0.0009998999303206801,
        3.500964879989624,
        -0.7499924898147583,
    ],
    [
        0.4999734163284302,
        -1.248429775238037,
        1.9969991445541382,
        -0.0029301221948117018,
        3.5010111331939697,
        -0.7500757575035095,
    ],
    [
        0.5001096725463867,
        -1.248392939567566,
        1.9970290660858154,
        -0.003303122939541936,
        3.5011494159698486,
        -0.75039142370224,
    ],
    [
        0.4996204078197479,
        -1.247802734375,
        1.9968510866165161,
        -0.002869169693440199,
        3.501201868057251,
        -0.7503427863121033,
    ],
];
const TORCH_Q: [[f32; 4]; 4] = [
    [
        0.09899900108575821,
        -0.19999800622463226,
        0.3009969890117645,
        0.3989960253238678,
    ],
    [
        0.09910228103399277,
        -0.20148226618766785,
        0.30088570713996887,
        0.39909330010414124,
    ],
    [
        0.0988832488656044,
        -0.20187519490718842,
        0.3005865514278412,
        0.3990180790424347,
    ],
    [
        0.09852423518896103,
        -0.2018173187971115,
        0.29986584186553955,
        0.39883869886398315,
    ],
];
const TORCH_M: [f32; 6] = [
    0.0874900072813034,
    -0.10198000073432922,
    0.018070003017783165,
    -7.651000487385318e-05,
    -0.11049999296665192,
    -0.005000001285225153,
];
const TORCH_V: [f32; 6] = [
    0.0011022876715287566,
    0.0010523577220737934,
    0.0004419003671500832,
    1.0498901747979517e-09,
    0.05388409644365311,
    0.0004997500218451023,
];

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

type P = Tensor<(usize, usize), f32, Cpu>;
type Q = Tensor<(usize, usize, usize, usize), f32, Cpu>;

fn params(dev: &Cpu) -> (P, Q) {
    (
        dev.tensor_from_vec(vec![0.5, -1.25, 2.0, 0.0, 3.5, -0.75], (2, 3)),
        dev.tensor_from_vec(vec![0.1, -0.2, 0.3, 0.4], (1, 1, 2, 2)),
    )
}

fn step(opt: &mut AdamW<Cpu>, dev: &Cpu, p: &mut P, q: &mut Q, s: usize) {
    let gp = dev.tensor_from_vec(GP[s].to_vec(), (2, 3));
    let gq = dev.tensor_from_vec(GQ[s].to_vec(), (1, 1, 2, 2));
    opt.update("p", p, &gp, LRS[s]).unwrap();
    opt.update("q", q, &gq, LRS[s]).unwrap();
}

#[test]
fn adamw_matches_torch() {
    let dev = Cpu::default();
    let (mut p, mut q) = params(&dev);
    let mut opt = AdamW::new(&dev, AdamWConfig::default());
    let mut worst = 0.0f32;
    for s in 0..4 {
        step(&mut opt, &dev, &mut p, &mut q, s);
        worst = worst.max(max_err(&p.as_vec(), &TORCH_P[s]));
        worst = worst.max(max_err(&q.as_vec(), &TORCH_Q[s]));
    }
    let st = opt.state("p").unwrap();
    // Relative: torch's vectorised lerp_ fuses `m + w·(g − m)` into one FMA, so the first
    // moment may differ from ours in the last bit.
    let rel = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1e-30))
            .fold(0.0, f32::max)
    };
    let moments = rel(&st.m.as_vec(), &TORCH_M).max(rel(&st.v.as_vec(), &TORCH_V));
    println!(
        "AdamW vs torch over 4 steps: params max abs error {worst:e}, moments max rel error {moments:e}"
    );
    assert_eq!(st.step, 4);
    assert!(worst <= 1e-6, "{worst}");
    assert!(moments <= 1e-6, "{moments}");
}

#[test]
fn adamw_state_checkpoint_resumes_bit_identically() {
    let dev = Cpu::default();
    let (mut p, mut q) = params(&dev);
    let mut straight = AdamW::new(&dev, AdamWConfig::default());
    for s in 0..4 {
        step(&mut straight, &dev, &mut p, &mut q, s);
    }

    let (mut p2, mut q2) = params(&dev);
    let mut first = AdamW::new(
        &dev,
        AdamWConfig {
            weight_decay: 1e-2,
            ..Default::default()
        },
    );
    for s in 0..2 {
        step(&mut first, &dev, &mut p2, &mut q2, s);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    first.save(&path).unwrap();
    let mut resumed = AdamW::load(&dev, &path).unwrap();
    assert_eq!(resumed.config, first.config);
    assert_eq!(resumed.names().collect::<Vec<_>>(), vec!["p", "q"]);
    assert_eq!(resumed.state("q").unwrap().step, 2);
    for s in 2..4 {
        step(&mut resumed, &dev, &mut p2, &mut q2, s);
    }
    assert_eq!(p.as_vec(), p2.as_vec());
    assert_eq!(q.as_vec(), q2.as_vec());

    // A parameter whose size changed is refused, naming it.
    let mut wrong: Tensor<(usize,), f32, Cpu> = dev.zeros_like(&(5,));
    let g = wrong.clone();
    let e = resumed
        .update("p", &mut wrong, &g, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`p`") && e.contains('5') && e.contains('6'),
        "{e}"
    );
    // A file that is not an optimiser state.
    std::fs::write(&path, b"nope").unwrap();
    assert!(AdamW::<Cpu>::load(&dev, &path).is_err());
}

#[test]
fn adamw_without_weight_decay_and_zero_grad() {
    // With wd 0 and a zero gradient the parameter must not move.
    let dev = Cpu::default();
    let mut p: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(vec![1.0, -2.0], (2,));
    let g = dev.zeros_like(&(2,));
    let mut opt = AdamW::new(
        &dev,
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    );
    opt.update("p", &mut p, &g, 0.1).unwrap();
    assert_eq!(p.as_vec(), vec![1.0, -2.0]);
    // With weight decay only the decay applies: p·(1 − lr·wd).
    let mut opt = AdamW::new(
        &dev,
        AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        },
    );
    opt.update("p", &mut p, &g, 0.1).unwrap();
    assert_eq!(p.as_vec(), vec![0.95, -1.9]);
}

#[test]
fn grad_clipping_matches_torch() {
    // torch: clip_grad_norm_([a=[3, 4], b=[[12]]], 1.0) → total 13, grads · 1/(13 + 1e-6).
    let dev = Cpu::default();
    let a: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(vec![3.0, 4.0], (2,));
    let b: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(vec![12.0], (1, 1));
    let (total, coef) = clip_coefficient(&[grad_norm(&a), grad_norm(&b)], 1.0);
    assert_eq!(total, 13.0);
    let a = (a * coef).as_vec();
    let b = (b * coef).as_vec();
    let err = max_err(&a, &[0.23076921701431274, 0.307692289352417])
        .max(max_err(&b, &[0.923076868057251]));
    println!("clip_grad_norm vs torch: max abs error {err:e}");
    assert!(err <= 1e-7, "{err}");
    // Same-shape helper; below the limit nothing changes.
    let mut gs: Vec<Tensor<(usize,), f32, Cpu>> = vec![dev.tensor_from_vec(vec![0.3, 0.4], (2,))];
    let total = clip_grad_norm(&mut gs, 1.0);
    assert!((total - 0.5).abs() < 1e-7);
    assert_eq!(gs[0].as_vec(), vec![0.3, 0.4]);
    let total = clip_grad_norm(&mut gs, 0.25);
    assert!((total - 0.5).abs() < 1e-7);
    assert!(max_err(&gs[0].as_vec(), &[0.15, 0.2]) < 1e-6);
}

#[test]
fn schedules_at_chosen_steps() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
    let c = LrSchedule::from_name("constant", 10, 100).unwrap();
    assert_eq!(c.lr_at(1e-4, 0), 1e-4);
    assert_eq!(c.lr_at(1e-4, 99), 1e-4);
    let w = LrSchedule::from_name("constant_with_warmup", 10, 100).unwrap();
    assert_eq!(w.lr_at(1e-3, 0), 0.0);
    assert!(close(w.lr_at(1e-3, 5), 5e-4));
    assert_eq!(w.lr_at(1e-3, 10), 1e-3);
    assert_eq!(w.lr_at(1e-3, 500), 1e-3);
    let cos = LrSchedule::from_name("cosine", 10, 110).unwrap();
    assert!(close(cos.lr_at(1.0, 5), 0.5));
    assert!(close(cos.lr_at(1.0, 10), 1.0));
    assert!(close(cos.lr_at(1.0, 60), 0.5)); // halfway through the decay: 0.5·(1 + cos(π/2))
    assert!(close(
        cos.lr_at(1.0, 35),
        0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())
    ));
    assert!(cos.lr_at(1.0, 110).abs() < 1e-15);
    let lin = LrSchedule::from_name("linear", 0, 100).unwrap();
    assert_eq!(lin.lr_at(2.0, 0), 2.0);
    assert!(close(lin.lr_at(2.0, 25), 1.5));
    assert_eq!(lin.lr_at(2.0, 100), 0.0);
    assert_eq!(lin.lr_at(2.0, 150), 0.0);
    let lin = LrSchedule::from_name("linear", 20, 120).unwrap();
    assert!(close(lin.lr_at(1.0, 10), 0.5));
    assert!(close(lin.lr_at(1.0, 70), 0.5));
    assert!(matches!(
        LrSchedule::from_name("cosine_with_restarts", 0, 1),
        Err(LrError::UnknownName(_))
    ));
    // An A1111 string by name.
    let a = LrSchedule::from_name("5e-5:100, 5e-6:1500, 1e-7", 0, 2000).unwrap();
    assert_eq!(a.lr_at(123.0, 99), 5e-5);
    assert_eq!(a.lr_at(123.0, 100), 5e-6);
}

#[test]
fn a1111_schedule_syntax() {
    let s = A1111Schedule::parse("5e-5:100, 5e-6:1500, 1e-7").unwrap();
    assert_eq!(
        s.pieces,
        vec![(5e-5, Some(100)), (5e-6, Some(1500)), (1e-7, None)]
    );
    assert_eq!(s.rate_at(0), 5e-5);
    assert_eq!(s.rate_at(99), 5e-5);
    assert_eq!(s.rate_at(100), 5e-6);
    assert_eq!(s.rate_at(1499), 5e-6);
    assert_eq!(s.rate_at(1500), 1e-7);
    assert_eq!(s.rate_at(1_000_000), 1e-7);
    assert_eq!(s.end_step(), None);
    let s = A1111Schedule::parse(" 0.005 ").unwrap();
    assert_eq!((s.rate_at(0), s.rate_at(10_000)), (0.005, 0.005));
    let s = A1111Schedule::parse("0.001:100,0.00001:1000,1e-5:10000").unwrap();
    assert_eq!(s.end_step(), Some(10000));
    assert_eq!(s.rate_at(999), 0.00001);
    assert_eq!(s.rate_at(20_000), 1e-5);
    let s = A1111Schedule::parse("1e-3:50, 1e-4:-1").unwrap();
    assert_eq!(s.pieces, vec![(1e-3, Some(50)), (1e-4, None)]);

    for (bad, needle) in [
        ("", "empty"),
        ("5e-5:100,", "empty"),
        ("abc:100", "`abc`"),
        ("5e-5:ten", "`ten`"),
        ("5e-5:1.5", "`1.5`"),
        ("5e-5:0", "`0`"),
        ("-1e-3:10", "`-1e-3`"),
        ("0:10", "`0`"),
        ("5e-5:100, 5e-6:100", "step 100"),
        ("5e-5:100, 5e-6:50", "step 50"),
        ("1e-4, 1e-5:100", "`1e-5:100`"),
        ("1e-4:-2", "`-2`"),
    ] {
        let e = A1111Schedule::parse(bad).unwrap_err().to_string();
        assert!(
            e.contains(needle) && e.contains("invalid learning-rate schedule"),
            "{bad}: {e}"
        );
    }
}

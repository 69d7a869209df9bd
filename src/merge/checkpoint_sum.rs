//! A1111's checkpoint merger: weighted sum `(1 − α)·A + α·B` and add difference
//! `A + α·(B − C)`, tensor by tensor over the UNet, VAE and text encoder. Tensors A has and the
//! other side lacks are kept from A (for add difference a tensor missing from C counts as zero
//! difference, as in A1111); tensors only B has are left out; differing shapes are an error
//! naming the tensor.

use std::collections::BTreeMap;

use super::{MergeError, Result};
use crate::formats::HostTensor;
use crate::formats::checkpoint::ModelTensors;

/// Counts of what a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SumReport {
    /// Tensors computed from every side.
    pub merged: usize,
    /// Tensors kept from A because another side lacked them.
    pub kept_from_a: usize,
    /// Tensors of B that A lacks (left out).
    pub only_in_b: usize,
}

fn parts(m: &ModelTensors) -> [(&'static str, &BTreeMap<String, HostTensor>); 3] {
    [
        ("unet", &m.unet),
        ("vae", &m.vae),
        ("text_encoder", &m.text_encoder),
    ]
}

fn check(name: &str, part: &str, a: &HostTensor, other: &str, b: &HostTensor) -> Result<()> {
    if a.shape != b.shape {
        return Err(MergeError::ShapeMismatch {
            name: format!("{part}: {name}"),
            what: "A".into(),
            a: a.shape.clone(),
            other: other.into(),
            b: b.shape.clone(),
        });
    }
    Ok(())
}

/// `A ← (1 − alpha)·A + alpha·B`, in place (one model's worth of memory less).
pub fn weighted_sum(a: &mut ModelTensors, b: &ModelTensors, alpha: f32) -> Result<SumReport> {
    combine(a, b, None, |x, y, _| (1.0 - alpha) * x + alpha * y)
}

/// `A ← A + alpha·(B − C)`, in place.
pub fn add_difference(
    a: &mut ModelTensors,
    b: &ModelTensors,
    c: &ModelTensors,
    alpha: f32,
) -> Result<SumReport> {
    combine(a, b, Some(c), |x, y, z| x + (y - z) * alpha)
}

fn parts_mut(m: &mut ModelTensors) -> [(&'static str, &mut BTreeMap<String, HostTensor>); 3] {
    [
        ("unet", &mut m.unet),
        ("vae", &mut m.vae),
        ("text_encoder", &mut m.text_encoder),
    ]
}

fn combine(
    a: &mut ModelTensors,
    b: &ModelTensors,
    c: Option<&ModelTensors>,
    f: impl Fn(f32, f32, f32) -> f32,
) -> Result<SumReport> {
    let mut report = SumReport::default();
    // check every shape first, so an error leaves A untouched
    let c_parts = c.map(parts);
    for (i, ((part, ta), (_, tb))) in parts(a).into_iter().zip(parts(b)).enumerate() {
        for (name, x) in ta {
            if let Some(y) = tb.get(name) {
                check(name, part, x, "B", y)?;
                if let Some(z) = c_parts.as_ref().and_then(|p| p[i].1.get(name)) {
                    check(name, part, x, "C", z)?;
                }
            }
        }
    }
    for (i, ((_, ta), (_, tb))) in parts_mut(a).into_iter().zip(parts(b)).enumerate() {
        let tc = c_parts.as_ref().map(|p| p[i].1);
        report.only_in_b += tb.keys().filter(|k| !ta.contains_key(*k)).count();
        for (name, x) in ta.iter_mut() {
            let Some(y) = tb.get(name) else {
                report.kept_from_a += 1;
                continue;
            };
            match tc {
                None => x
                    .data
                    .iter_mut()
                    .zip(&y.data)
                    .for_each(|(x, y)| *x = f(*x, *y, 0.0)),
                Some(tc) => match tc.get(name) {
                    Some(z) => x
                        .data
                        .iter_mut()
                        .zip(&y.data)
                        .zip(&z.data)
                        .for_each(|((x, y), z)| *x = f(*x, *y, *z)),
                    None => {
                        // A1111: no C tensor means no difference
                        report.kept_from_a += 1;
                        continue;
                    }
                },
            }
            report.merged += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vals: &[(&str, Vec<f32>)]) -> ModelTensors {
        let mut m = ModelTensors::default();
        for (k, v) in vals {
            m.unet.insert(
                k.to_string(),
                HostTensor::new(vec![v.len()], v.clone()).unwrap(),
            );
        }
        m
    }

    #[test]
    fn weighted_sum_and_add_difference_follow_a1111() {
        let a = model(&[("x", vec![1.0, 2.0]), ("only_a", vec![5.0])]);
        let b = model(&[("x", vec![3.0, -2.0]), ("only_b", vec![7.0])]);
        let c = model(&[("x", vec![1.0, 1.0])]);
        let mut m = a.clone();
        let r = weighted_sum(&mut m, &b, 0.25).unwrap();
        assert_eq!(m.unet["x"].data, vec![1.5, 1.0]);
        assert_eq!(m.unet["only_a"].data, vec![5.0]);
        assert!(!m.unet.contains_key("only_b"));
        assert_eq!(
            r,
            SumReport {
                merged: 1,
                kept_from_a: 1,
                only_in_b: 1
            }
        );
        let mut m = a.clone();
        add_difference(&mut m, &b, &c, 0.5).unwrap();
        assert_eq!(m.unet["x"].data, vec![2.0, 0.5]);
        // α = 0 gives A, weighted α = 1 gives B
        let mut m = a.clone();
        weighted_sum(&mut m, &b, 1.0).unwrap();
        assert_eq!(m.unet["x"].data, vec![3.0, -2.0]);
        let mut m = a.clone();
        add_difference(&mut m, &b, &c, 0.0).unwrap();
        assert_eq!(m.unet["x"].data, vec![1.0, 2.0]);
    }

    #[test]
    fn mismatched_shapes_name_the_tensor() {
        let a = model(&[("down.x", vec![1.0, 2.0])]);
        let b = model(&[("down.x", vec![1.0, 2.0, 3.0])]);
        let mut m = a.clone();
        let err = weighted_sum(&mut m, &b, 0.5).unwrap_err().to_string();
        assert_eq!(m, a, "A is untouched on error");
        assert!(
            err.contains("down.x") && err.contains("[2]") && err.contains("[3]"),
            "{err}"
        );
    }
}

//! Range checks shared by the stages' `validate`: a value the TOML parser accepts (`nan`,
//! `inf`, `1e30`) but no training or sampling can use is refused at its key, before anything
//! runs, instead of surfacing as a NaN stop minutes later.

use super::ParamError;

/// The largest learning rate accepted. Adapters train at 1e-5 … 1e-2 and Prodigy/D-Adaptation
/// at 1.0 (they scale it themselves); anything above 10 diverges on the first step.
pub(crate) const MAX_LEARNING_RATE: f64 = 10.0;

/// A learning rate: finite, positive, at most [`MAX_LEARNING_RATE`].
pub(crate) fn learning_rate(key: &str, lr: f64, help: &str) -> Result<(), ParamError> {
    if !(lr.is_finite() && lr > 0.0) {
        return Err(ParamError::new(
            key,
            format!("{key} = {lr} must be a positive number"),
            help,
        ));
    }
    if lr > MAX_LEARNING_RATE {
        return Err(ParamError::new(
            key,
            format!(
                "{key} = {lr:e} is beyond any rate that trains (at most {MAX_LEARNING_RATE}): the \
                 first step would turn the weights into NaN"
            ),
            format!("{help}; adapters use 1e-5 … 1e-2"),
        ));
    }
    Ok(())
}

/// A finite number ≥ 0 (weights of loss terms, weight decay, norms).
pub(crate) fn non_negative(key: &str, v: f64, help: &str) -> Result<(), ParamError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(ParamError::new(
            key,
            format!("{key} = {v} must be a finite number ≥ 0"),
            help,
        ))
    }
}

/// A finite number > 0.
pub(crate) fn positive(key: &str, v: f64, help: &str) -> Result<(), ParamError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(ParamError::new(
            key,
            format!("{key} = {v} must be a finite number > 0"),
            help,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_toml_accepts_but_nothing_can_train_with_is_refused() {
        for bad in [f64::NAN, f64::INFINITY, -1e-4, 0.0, 1e30] {
            assert!(learning_rate("lr", bad, "h").is_err(), "{bad}");
        }
        for good in [1e-6, 1e-4, 5e-3, 1.0, 10.0] {
            assert!(learning_rate("lr", good, "h").is_ok(), "{good}");
        }
        let e = learning_rate("lora.lr", 1e30, "h").unwrap_err();
        assert_eq!(e.field, "lora.lr");
        assert!(e.message.contains("1e30"), "{}", e.message);
        assert!(non_negative("w", f64::NAN, "h").is_err());
        assert!(non_negative("w", 0.0, "h").is_ok());
        assert!(positive("alpha", 0.0, "h").is_err());
        assert!(positive("alpha", f64::NAN, "h").is_err());
        assert!(positive("alpha", 8.0, "h").is_ok());
    }
}

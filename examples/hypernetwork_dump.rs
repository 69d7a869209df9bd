//! Writes A1111 hypernetwork `.pt` files (one per activation, with layer norm, dropout and
//! non-trivial biases) and sdpipe's module outputs on random inputs, for
//! `scripts/check_hypernetwork_with_torch.py` to compare against torch re-running A1111's
//! module. Usage: `cargo run --release --example hypernetwork_dump -- OUT_DIR`.
use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use sdpipe::formats::HostTensor;
use sdpipe::formats::hypernetwork::*;
use sdpipe::train::hypernetwork::HyperNet;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/hypernetwork-dump".into());
    let out = Path::new(&dir);
    std::fs::create_dir_all(out).unwrap();
    let dev = Cpu::default();
    let mut noise = sdpipe::diffusion::schedulers::SeededNoise::new(5);
    for act in [
        "linear",
        "relu",
        "leakyrelu",
        "elu",
        "swish",
        "tanh",
        "sigmoid",
        "silu",
        "gelu",
        "relu6",
        "softplus",
        "mish",
        "selu",
    ] {
        let config = HypernetworkConfig {
            layer_structure: vec![1.0, 2.0, 1.5, 1.0],
            activation_func: Some(act.into()),
            is_layer_norm: act != "relu",
            activate_output: act == "tanh",
            use_dropout: true,
            dropout_structure: Some(vec![0.0, 0.3, 0.2, 0.0]),
            weight_initialization: "XavierNormal".into(),
            last_layer_dropout: true,
        };
        let mut hn = Hypernetwork::new(act, config, &[8, 12], 9).unwrap();
        for (k, v) in hn.modules.values_mut() {
            for m in [k, v] {
                for l in &mut m.layers {
                    l.bias
                        .data
                        .iter_mut()
                        .for_each(|x| *x = noise.next_normal() as f32 * 0.5);
                    if let Some((w, b)) = &mut l.layer_norm {
                        w.data
                            .iter_mut()
                            .for_each(|x| *x = 1.0 + noise.next_normal() as f32 * 0.3);
                        b.data
                            .iter_mut()
                            .for_each(|x| *x = noise.next_normal() as f32 * 0.3);
                    }
                }
            }
        }
        write_hypernetwork_pt(&out.join(format!("{act}.pt")), &hn).unwrap();
        let net = HyperNet::<Cpu>::from_host(&hn, &dev).unwrap();
        let mut tensors = BTreeMap::new();
        for (w, (k, v)) in &net.modules {
            let data: Vec<f32> = (0..2 * 5 * w)
                .map(|_| noise.next_normal() as f32 * 2.0)
                .collect();
            let x = dev.tensor_from_vec(data, (2, 5, *w));
            tensors.insert(format!("{w}.x"), HostTensor::from_tensor(&x));
            tensors.insert(
                format!("{w}.k"),
                HostTensor::from_tensor(&k.forward(x.clone(), 0.7, None)),
            );
            tensors.insert(
                format!("{w}.v"),
                HostTensor::from_tensor(&v.forward(x.clone(), 0.7, None)),
            );
        }
        sdpipe::formats::write_safetensors(
            &out.join(format!("{act}.out.safetensors")),
            &tensors,
            None,
        )
        .unwrap();
    }
}

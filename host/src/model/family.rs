//! The families `stuffed` runs, named once: [`Family`] and its table (`families!` below), and what a
//! path holds ([`detect`]). Adding a family is one line of that table and one host file beside this.
use super::{delta_net, gla, hgrn2, mamba1, mamba2, rwkv, rwkv7, xlstm, Loader};
use crate::config;
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// The tokenizer a family's models use when their directory names none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vocab {
    /// The shipped RWKV World vocab.
    World,
    /// The model directory's tokenizer.json, else the shipped GPT-NeoX-20B one.
    NeoxUnlessGiven,
    /// The model directory's tokenizer.json, or an error (its vocab is not shipped).
    OwnOnly,
}

/// One line per family: its enum variant, the name outputs and flags use, the HF `model_type`s that
/// name it in a config.json, its human title, its host file (whose `load` builds it) and its vocab.
macro_rules! families {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, model_types [$($mt:literal),*], $title:literal,
       $host:ident, $vocab:ident;)*) => {
        /// A model family, by its host file and name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Family {
            $($(#[$doc])* $variant,)*
        }

        impl Family {
            /// Every family, in table order.
            pub const ALL: &'static [Family] = &[$(Family::$variant),*];

            /// The name outputs, flags and configs use (`mamba2`, `rwkv6`, …).
            pub fn name(self) -> &'static str {
                match self { $(Family::$variant => $name,)* }
            }

            /// How people write it (`Mamba-2`, `RWKV-6`, …), for messages.
            pub fn title(self) -> &'static str {
                match self { $(Family::$variant => $title,)* }
            }

            /// The `model_type`s of an HF config.json that name this family.
            fn model_types(self) -> &'static [&'static str] {
                match self { $(Family::$variant => &[$($mt),*],)* }
            }

            /// Its host file's loader.
            pub(super) fn loader(self) -> Loader {
                match self { $(Family::$variant => $host::load,)* }
            }

            /// The tokenizer its models use unless told.
            pub fn vocab(self) -> Vocab {
                match self { $(Family::$variant => Vocab::$vocab,)* }
            }
        }
    };
}

families! {
    Mamba2 = "mamba2", model_types ["mamba2"], "Mamba-2", mamba2, NeoxUnlessGiven;
    /// RWKV-5.2 (Eagle); shares its host file with RWKV-6, which tells them apart by tensor names.
    Rwkv5 = "rwkv5", model_types ["rwkv5"], "RWKV-5.2", rwkv, World;
    Rwkv6 = "rwkv6", model_types ["rwkv6"], "RWKV-6", rwkv, World;
    Hgrn2 = "hgrn2", model_types ["hgrn2"], "HGRN-2", hgrn2, OwnOnly;
    /// Mamba-1, and FalconMamba (its weightless norms on dt, B and C).
    Mamba1 = "mamba1", model_types ["mamba", "falcon_mamba"], "Mamba-1", mamba1, NeoxUnlessGiven;
    /// RWKV-7 (x070): its `.pth` is found as RWKV's and handed on by tensor names; the tokenizer
    /// follows the embedding's rows (host/src/model/rwkv7.rs).
    Rwkv7 = "rwkv7", model_types ["rwkv7"], "RWKV-7", rwkv7, World;
    Gla = "gla", model_types ["gla"], "GLA", gla, OwnOnly;
    /// RetNet: GLA's block with a fixed decay per head and rotary embeddings (host/src/model/gla.rs).
    RetNet = "retnet", model_types ["retnet"], "RetNet", gla, OwnOnly;
    /// DeltaNet and Gated DeltaNet share one host file and one core file (the delta rule).
    DeltaNet = "delta_net", model_types ["delta_net"], "DeltaNet", delta_net, OwnOnly;
    GatedDeltaNet = "gated_deltanet", model_types ["gated_deltanet"], "Gated DeltaNet", delta_net, OwnOnly;
    /// xLSTM (mLSTM blocks, HF `xLSTMForCausalLM`; NX-AI's xLSTM-7b).
    Xlstm = "xlstm", model_types ["xlstm"], "xLSTM", xlstm, OwnOnly;
}

impl Family {
    /// The family `name` names (`--family`, a results file), if any.
    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.iter().copied().find(|f| f.name() == name)
    }

    /// The family an HF `model_type` names, if any.
    fn of_model_type(model_type: &str) -> Option<Family> {
        Family::ALL.iter().copied().find(|f| f.model_types().contains(&model_type))
    }

    /// The family a config.json names, or a clear error naming the file. An official Mamba config
    /// (`ssm_cfg`, `d_model`) has no `model_type`.
    pub fn of_config(cfg: &Value, path: &Path) -> Result<Family> {
        match cfg.get("model_type").and_then(Value::as_str) {
            Some(t) => match Family::of_model_type(t) {
                Some(f) => Ok(f),
                None => bail!("{}: unknown architecture '{t}' (supported: {})", path.display(), Family::names()),
            },
            // `ssm_cfg.layer` defaults to Mamba1 in mamba_ssm (the Mamba-1 loader refuses other values).
            None if cfg.get("ssm_cfg").is_some() || cfg.get("d_model").is_some() => {
                match cfg.get("ssm_cfg").and_then(|s| s.get("layer")).and_then(Value::as_str) {
                    Some("Mamba2") => Ok(Family::Mamba2),
                    _ => Ok(Family::Mamba1),
                }
            }
            None => bail!("{}: unknown architecture: no 'model_type' and no official Mamba fields", path.display()),
        }
    }

    /// What a model directory holds, as far as choosing its tokenizer cares: never an error.
    pub fn of_dir(dir: &Path) -> Option<Family> {
        let cfg = dir.join("config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg) {
            let json = serde_json::from_str::<Value>(&text).ok()?;
            return Family::of_model_type(json.get("model_type")?.as_str()?);
        }
        let has_pth = std::fs::read_dir(dir).is_ok_and(|rd| rd.flatten().any(|e| is_pth(&e.path())));
        has_pth.then_some(BLINKDL_PTH)
    }

    /// Every family's name, comma-separated (for messages).
    pub fn names() -> String {
        Family::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
    }
}

/// The family whose host file reads a BlinkDL `.pth` beside no config.json (RWKV; the file's
/// tensors tell 5.2 from 6).
const BLINKDL_PTH: Family = Family::Rwkv6;

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Family {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Family {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Family, D::Error> {
        let name = String::deserialize(d)?;
        Family::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown family '{name}' (known: {})", Family::names())))
    }
}

impl clap::ValueEnum for Family {
    fn value_variants<'a>() -> &'a [Self] {
        Family::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// A config.json, read.
pub struct Config {
    pub path: PathBuf,
    pub json: Value,
}

/// What a model path holds: which host file loads it, from which file or directory, with which
/// config.json (RWKV's BlinkDL `.pth` has none).
pub struct Found {
    /// The family whose host file loads it (RWKV-5.2 and RWKV-6 share one).
    pub family: Family,
    /// The file or directory to open.
    pub weights: PathBuf,
    pub config: Option<Config>,
    /// Where a config.json would be (named in messages when there is none).
    pub config_path: PathBuf,
}

impl Found {
    /// The config.json, which every family but a BlinkDL `.pth` has (checked by [`detect`]).
    pub fn config(&self) -> Result<&Config> {
        self.config
            .as_ref()
            .ok_or_else(|| anyhow!("{}: missing config.json beside the weights", self.config_path.display()))
    }
}

fn is_pth(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "pth")
}

/// What `path` (a checkpoint file or directory) holds: a config.json beside it names the family; a
/// BlinkDL `.pth` (named, or alone in a directory without config.json) is RWKV.
pub fn detect(path: &Path) -> Result<Found> {
    let (dir, pth) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let dir =
            path.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        (dir, is_pth(path).then(|| path.to_path_buf()))
    };
    let config_path = dir.join("config.json");
    let rwkv =
        |weights: PathBuf, config_path: PathBuf| Found { family: BLINKDL_PTH, weights, config: None, config_path };
    if let Some(p) = pth {
        return Ok(rwkv(p, config_path));
    }
    if config_path.exists() {
        let json = config::read_json(&config_path)?;
        let family = Family::of_config(&json, &config_path)?;
        let config = Some(Config { path: config_path.clone(), json });
        return Ok(Found { family, weights: path.to_path_buf(), config, config_path });
    }
    if path.is_dir() {
        let mut pths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| anyhow!("{}: cannot list: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_pth(p))
            .collect();
        pths.sort();
        match pths.as_slice() {
            [] => {}
            [one] => return Ok(rwkv(one.clone(), config_path)),
            _ => bail!("{}: several .pth files and no config.json; name the one to load", dir.display()),
        }
    }
    // Weights without a config: open them first, so that a path that is no checkpoint says so.
    crate::checkpoint::Checkpoint::open(path)?;
    bail!("{}: missing config.json beside the weights", config_path.display())
}

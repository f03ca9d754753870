//! Finding or building guest images and the patched QEMU, through the scripts in
//! `guest-images/` (which cache their results outside the work tree).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sluice_host::machine::Arch;

/// The guest variant used when none is named.
pub const DEFAULT_VARIANT: &str = "6.12";

/// The guest variant a run of `arch` boots when none is named.
pub fn default_variant(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => DEFAULT_VARIANT,
        Arch::Aarch64 => "arm64-6.12",
        // No s390x variant yet: the name the s390x issue will give it, refused by its check.
        Arch::S390x => "s390x-6.12",
    }
}

/// How far above its System.map addresses the guest kernel of `system_map` runs its text: on
/// s390 the kernel image is mapped at `CONFIG_KERNEL_IMAGE_BASE` when KASLR is off (Sluice's
/// s390x runs pass `nokaslr`), read from the `config` that build.sh leaves next to System.map.
/// 0 for every other kernel, and when there is no config to read.
pub fn kernel_text_bias(system_map: &Path) -> u64 {
    let Some(config) = system_map
        .parent()
        .and_then(|d| std::fs::read_to_string(d.join("config")).ok())
    else {
        return 0;
    };
    if !config.lines().any(|l| l == "CONFIG_S390=y") {
        return 0;
    }
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_KERNEL_IMAGE_BASE="))
        .and_then(|v| {
            u64::from_str_radix(v.trim_start_matches("0x").trim_start_matches("0X"), 16).ok()
        })
        .unwrap_or(0)
}

/// Paths of one built guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub vmlinux: PathBuf,
    pub system_map: PathBuf,
    pub initrd: PathBuf,
}

/// The checkout's root: `SLUICE_ROOT`, or where this crate was built from.
pub fn repo_root() -> PathBuf {
    std::env::var_os("SLUICE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .canonicalize()
                .unwrap_or_else(|_| PathBuf::from("."))
        })
}

/// How a build script's progress reaches the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutput {
    /// Every line (`sluice image build`, `sluice run`).
    Verbose,
    /// Nothing when the script finds its result cached; its progress from the moment it
    /// really builds (or waits for another build's lock); warnings and errors always; the
    /// lines held back if it fails.
    QuietIfCached,
}

/// What to do with one line of a build script's stderr under [`BuildOutput::QuietIfCached`].
/// The scripts announce a cache hit by stages that say `skipped` or `cached`
/// (`[2/7] unpack source: skipped`, `[3/6] download: skipped`); from stage 3 on, any other
/// stage, a heartbeat (`      ... 15s ...`) or a lock wait means real work.
#[derive(Debug, Default)]
pub struct CacheHitFilter {
    state: FilterState,
    held: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FilterState {
    #[default]
    Undecided,
    CacheHit,
    Building,
}

/// Lines kept for a failure report once the script turned out to be quiet.
const HELD_LINES: usize = 60;

impl CacheHitFilter {
    /// The lines to print now, given the script's next line.
    pub fn line(&mut self, line: &str) -> Vec<String> {
        if self.state == FilterState::Building || line.contains("WARNING") || line.contains("ERROR")
        {
            return vec![line.to_string()];
        }
        let stage = stage_number(line);
        let says_cached = line.contains(": skipped") || line.contains(": cached");
        if self.state == FilterState::Undecided {
            if stage.is_some() && says_cached {
                self.state = FilterState::CacheHit;
            } else if stage.is_some_and(|k| k >= 3)
                || line.trim_start().starts_with("... ")
                || line.contains("waiting for its lock")
                || line.contains("installing missing packages")
            {
                self.state = FilterState::Building;
                let mut out = std::mem::take(&mut self.held);
                out.push(line.to_string());
                return out;
            }
        }
        self.held.push(line.to_string());
        if self.held.len() > HELD_LINES {
            self.held.remove(0);
        }
        Vec::new()
    }

    /// The lines held back, to show when the script failed.
    pub fn held(self) -> Vec<String> {
        self.held
    }
}

/// `k` of a `[k/n] text` stage line.
fn stage_number(line: &str) -> Option<u32> {
    let rest = line.strip_prefix('[')?;
    let (k, rest) = rest.split_once('/')?;
    let (n, _) = rest.split_once(']')?;
    n.parse::<u32>().ok()?;
    k.parse().ok()
}

/// Runs a build script, showing its progress on stderr as `output` says, and returns its
/// KEY=VALUE lines.
fn run_script_with(
    script: &Path,
    args: &[&str],
    output: BuildOutput,
) -> Result<Vec<(String, String)>> {
    if !script.exists() {
        bail!("build script {} is missing", script.display());
    }
    // The scripts serialise concurrent builds of the same image themselves (per-key locks).
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(match output {
            BuildOutput::Verbose => Stdio::inherit(),
            BuildOutput::QuietIfCached => Stdio::piped(),
        })
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    // stderr is read on its own thread so neither pipe can fill up while the other is read.
    let filtered = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            let mut filter = CacheHitFilter::default();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                for shown in filter.line(&line) {
                    eprintln!("{shown}");
                }
            }
            filter.held()
        })
    });
    let mut vars = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            match line.split_once('=') {
                Some((k, v))
                    if !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
                {
                    vars.push((k.to_string(), v.to_string()))
                }
                _ => eprintln!("{line}"),
            }
        }
    }
    let status = child.wait()?;
    let held = filtered
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    if !status.success() {
        for line in held {
            eprintln!("{line}");
        }
        bail!("{} failed ({status})", script.display());
    }
    Ok(vars)
}

fn var(vars: &[(String, String)], key: &str) -> Result<PathBuf> {
    vars.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| PathBuf::from(v))
        .with_context(|| format!("build script printed no {key}="))
}

/// The architecture of guest `variant`: the one-line `arch` file in its directory
/// (`guest-images/variants/<name>/arch`), x86_64 when there is none. `build.sh` reads the same
/// file; it is the only place a variant's architecture is written down.
pub fn variant_arch(variant: &str) -> Result<Arch> {
    variant_arch_in(&repo_root().join("guest-images/variants"), variant)
}

fn variant_arch_in(variants: &Path, variant: &str) -> Result<Arch> {
    // A name with a path in it would read some other file.
    if variant.is_empty() || variant.contains('/') || variant.starts_with('.') {
        bail!("bad guest variant name {variant:?}");
    }
    let path = variants.join(variant).join("arch");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Arch::X86_64),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Builds or finds guest `variant` for `arch` (the script refuses a variant of another
/// architecture).
pub fn build_guest(variant: &str, arch: Arch) -> Result<GuestImage> {
    build_guest_with(variant, arch, BuildOutput::Verbose)
}

/// [`build_guest`] with a choice of how much progress to show.
pub fn build_guest_with(variant: &str, arch: Arch, output: BuildOutput) -> Result<GuestImage> {
    let vars = run_script_with(
        &repo_root().join("guest-images/build.sh"),
        &["--arch", arch.name(), variant],
        output,
    )?;
    Ok(GuestImage {
        kernel: var(&vars, "KERNEL")?,
        vmlinux: var(&vars, "VMLINUX")?,
        system_map: var(&vars, "SYSTEM_MAP")?,
        initrd: var(&vars, "INITRD")?,
    })
}

/// Builds or finds the QEMU with the project's proxy patch (needed under TCG) for `arch`.
pub fn build_qemu(arch: Arch) -> Result<PathBuf> {
    build_qemu_with(arch, BuildOutput::Verbose)
}

/// [`build_qemu`] with a choice of how much progress to show.
pub fn build_qemu_with(arch: Arch, output: BuildOutput) -> Result<PathBuf> {
    let vars = run_script_with(
        &repo_root().join("guest-images/qemu/build-qemu.sh"),
        &["--arch", arch.name()],
        output,
    )?;
    var(&vars, "QEMU")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(transcript: &str) -> Vec<String> {
        let mut f = CacheHitFilter::default();
        transcript.lines().flat_map(|l| f.line(l)).collect()
    }

    #[test]
    fn s390_kernels_run_their_text_at_the_image_base() {
        let dir = std::env::temp_dir().join(format!("sluice-bias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map = dir.join("System.map");
        assert_eq!(kernel_text_bias(&map), 0, "no config next to it");
        std::fs::write(
            dir.join("config"),
            "CONFIG_S390=y\nCONFIG_KERNEL_IMAGE_BASE=0x3FFE0000000\n",
        )
        .unwrap();
        assert_eq!(kernel_text_bias(&map), 0x3ff_e000_0000);
        std::fs::write(
            dir.join("config"),
            "CONFIG_X86_64=y\nCONFIG_KERNEL_IMAGE_BASE=0x1000\n",
        )
        .unwrap();
        assert_eq!(kernel_text_bias(&map), 0, "only s390 maps its image there");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_variant_names_its_arch_in_one_file() {
        let dir = std::env::temp_dir().join(format!("sluice-variants-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("6.12")).unwrap();
        std::fs::create_dir_all(dir.join("arm64-6.12")).unwrap();
        std::fs::create_dir_all(dir.join("odd")).unwrap();
        std::fs::write(dir.join("arm64-6.12/arch"), "aarch64\n").unwrap();
        std::fs::write(dir.join("odd/arch"), "mips\n").unwrap();
        assert_eq!(variant_arch_in(&dir, "6.12").unwrap(), Arch::X86_64);
        assert_eq!(variant_arch_in(&dir, "arm64-6.12").unwrap(), Arch::Aarch64);
        let e = format!("{:#}", variant_arch_in(&dir, "odd").unwrap_err());
        assert!(
            e.ends_with(
                "odd/arch: unknown architecture `mips` (known: x86_64, aarch64 or arm64, s390x)"
            ),
            "{e}"
        );
        assert!(variant_arch_in(&dir, "../etc").is_err());
        // The checkout's own variants are all x86_64 today.
        assert_eq!(variant_arch(DEFAULT_VARIANT).unwrap(), Arch::X86_64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cached_builds_are_silent() {
        // `guest-images/build.sh 6.12` and `build-qemu.sh` with everything cached.
        let guest = "build.sh: variant 6.12: Linux 6.12\n[1/7] host packages  (t+0s)\n      \
                     source linux-source-6.12 6.12.117-1~deb12u1, key fa47cec5aacfa8cc\n\
                     [2/7] unpack source: skipped  (t+0s)\n[3/7] configure: skipped  (t+0s)\n\
                     [4/7] kernel: cached (/root/.cache/sluice/guest/6.12-fa47)  (t+0s)\ncached\n\
                     [6/7] initramfs (busybox)  (t+0s)\n      initramfs unchanged\n\
                     [7/7] manifest  (t+1s)\nbuild.sh: 6.12 done in 1s";
        assert!(shown(guest).is_empty(), "{:?}", shown(guest));
        let qemu = "[1/6] host packages  (t+0s)\n[2/6] deb-src entry + qemu source version  (t+0s)\n\
                    [3/6] download: skipped  (t+0s)\n[4/6] unpack + patch: skipped  (t+0s)\n\
                    [6/6] build: cached (/root/.cache/sluice/qemu/ee27/qemu-system-x86_64)\ncached";
        assert!(shown(qemu).is_empty());
    }

    #[test]
    fn real_builds_show_progress_from_the_first_sign_of_work() {
        let guest = "build.sh: variant 6.1\n[1/7] host packages  (t+0s)\n\
                     [2/7] unpack source (x.tar.xz -> /src)  (t+0s)\n      already unpacked\n\
                     [3/7] configure (tinyconfig + ...)  (t+0s)\n      config OK\n\
                     [4/7] build kernel: make -j2\n      ... 15s 120 objects built";
        let out = shown(guest);
        assert_eq!(out.len(), 8, "everything, held lines first: {out:?}");
        assert_eq!(out[0], "build.sh: variant 6.1");
        assert_eq!(out[7], "      ... 15s 120 objects built");
        let waiting = shown(
            "[1/7] host packages\n      another build of 6.12-x is running; waiting for its lock (x.lock)\n[2/7] unpack source: skipped",
        );
        assert_eq!(
            waiting.len(),
            3,
            "a lock wait may be long: say so, and keep talking"
        );
    }

    #[test]
    fn warnings_always_and_held_lines_on_failure() {
        let mut f = CacheHitFilter::default();
        assert!(f.line("[1/6] host packages").is_empty());
        assert!(f.line("[3/6] download: skipped").is_empty());
        assert_eq!(
            f.line("build-qemu.sh: WARNING: the Sluice TCG plugin did not build"),
            ["build-qemu.sh: WARNING: the Sluice TCG plugin did not build"]
        );
        assert!(f.line("[6/6] build: cached (x)").is_empty());
        assert_eq!(
            f.held(),
            [
                "[1/6] host packages",
                "[3/6] download: skipped",
                "[6/6] build: cached (x)"
            ]
        );
        assert_eq!(stage_number("[12/30] x"), Some(12));
        assert_eq!(stage_number("[a/3] x"), None);
        assert_eq!(stage_number("      [2/7]"), None);
    }
}

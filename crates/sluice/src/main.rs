//! The `sluice` command.

mod demo;
mod explore_cmd;
mod harness_cmd;
mod image;
mod merge_cmd;
mod report;
mod rogue;
mod run;
mod sweep_cmd;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Boot real Linux guests against Sluice's devices and IOMMUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest with Sluice's devices, run its workload, verify the disks, print the verdict.
    Run(Box<run::RunArgs>),
    /// The race demo: stock Linux 6.12 falls into its IOMMU driver's registration window under
    /// Sluice's injection (x86_64: virtio-iommu, the DMA escapes; arm64: SMMUv3, the DMA is
    /// refused); prints the verdict and where the timeline is.
    Demo {
        /// Guest architecture: x86_64 or arm64.
        #[arg(long, default_value = "x86_64", value_parser = run::parse_arch)]
        arch: sluice_host::machine::Arch,
    },
    /// Regression harness: scenarios x kernel variants x seeds.
    Harness {
        #[command(subcommand)]
        command: HarnessCmd,
    },
    /// List the race-injection points a run of this configuration can fire (`--all`: every model's).
    Points {
        /// Disks of the run to list points for.
        #[arg(long, default_value_t = 1)]
        disks: usize,
        /// IOMMU of the run.
        #[arg(long, value_enum, default_value = "virtio")]
        iommu: run::IommuArg,
        /// The run has Sluice's DMA engine (`--dma-engine` of `run`).
        #[arg(long)]
        dma_engine: bool,
        /// Every point of every model, also those this configuration cannot fire.
        #[arg(long)]
        all: bool,
    },
    /// Summarise a run directory: DMA outcomes per endpoint, escapes, and an SVG timeline around
    /// each escape.
    Report {
        /// A run directory (the one `sluice run` printed).
        run_dir: std::path::PathBuf,
    },
    /// Guest images.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
}

#[derive(Subcommand)]
enum HarnessCmd {
    /// Run scenario files; print a summary; write JUnit and JSON; exit non-zero on any
    /// unexpected outcome.
    Run(Box<harness_cmd::HarnessRunArgs>),
    /// Explore one scenario over injection points x delays x modes x seeds within a time
    /// budget; print which cells reproduce, per variant; write JSON (and JUnit if asked).
    /// Exit 0: every run done and the judgement holds; 1: some runs could not be performed;
    /// 3: the budget stopped it; 4: the judgement failed (a run broke one of the scenario's
    /// invariants, or a variant it expects to reproduce on reproduced in no cell).
    Sweep(Box<sweep_cmd::HarnessSweepArgs>),
    /// Hunt for unknown interleavings from a base scenario: choose guest-code and device points
    /// (a probe learns which a run reaches), try them over a delay ladder and in pairs, group
    /// anomalies (escapes, faults, kernel reports, hangs, workload failures) by signature,
    /// minimize each new one into a scenario file. Writes explore.json, junit.xml, summary.txt,
    /// findings/*.toml. Exit 0: done; 1: some runs could not be performed; 3: budget reached.
    Explore(Box<explore_cmd::HarnessExploreArgs>),
    /// Merge shard output directories (of `explore --shard` or `run --shard`) into one report.
    Merge(Box<merge_cmd::HarnessMergeArgs>),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build (or find in the cache) a guest variant's kernel, System.map and initramfs.
    Build {
        /// Variant name (guest-images/variants/<name>).
        #[arg(default_value = image::DEFAULT_VARIANT)]
        variant: String,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run::run(*args),
        Cmd::Harness {
            command: HarnessCmd::Run(args),
        } => harness_cmd::run(*args),
        Cmd::Harness {
            command: HarnessCmd::Sweep(args),
        } => sweep_cmd::sweep(*args),
        Cmd::Harness {
            command: HarnessCmd::Explore(args),
        } => explore_cmd::explore(*args),
        Cmd::Harness {
            command: HarnessCmd::Merge(args),
        } => merge_cmd::merge(*args),
        Cmd::Demo { arch } => demo::run(arch),
        Cmd::Points {
            disks,
            iommu,
            dma_engine,
            all,
        } => {
            let reg = if all {
                run::all_points(disks, iommu)
            } else {
                run::config_points(disks, iommu, dma_engine)
            };
            let mut text = String::new();
            for p in reg.points() {
                // What a rule can do there: defer the completion; and where the point is
                // reached: inside a doorbell write, or once per I/O (sampled in timelines).
                let props: Vec<&str> =
                    [(p.defer, "defer"), (p.doorbell, "doorbell"), (p.hot, "hot")]
                        .iter()
                        .filter(|(on, _)| *on)
                        .map(|(_, name)| *name)
                        .collect();
                text.push_str(&format!(
                    "{:<40} {:<20} {}\n",
                    p.name,
                    props.join(","),
                    p.owner
                ));
            }
            for p in reg.patterns() {
                text.push_str(&p);
                text.push('\n');
            }
            // A reader that stops early (`| head`) is not an error of ours.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { run_dir } => sluice_oracle::render::render_report(&run_dir)
            .map_err(anyhow::Error::from)
            .map(|(text, svgs)| {
                print!("{text}");
                for s in &svgs {
                    eprintln!("sluice: wrote {}", s.display());
                }
                ExitCode::SUCCESS
            }),
        Cmd::Image {
            command: ImageCmd::Build { variant },
        } => image::variant_arch(&variant)
            .and_then(|arch| image::build_guest(&variant, arch))
            .map(|img| {
                println!("KERNEL={}", img.kernel.display());
                println!("VMLINUX={}", img.vmlinux.display());
                println!("SYSTEM_MAP={}", img.system_map.display());
                println!("INITRD={}", img.initrd.display());
                ExitCode::SUCCESS
            }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

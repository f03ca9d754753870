//! The `sluice` command.

mod harness_cmd;
mod image;
mod report;
mod run;
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
    /// Regression harness: scenarios x kernel variants x seeds.
    Harness {
        #[command(subcommand)]
        command: HarnessCmd,
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
        Cmd::Image {
            command: ImageCmd::Build { variant },
        } => image::build_guest(&variant).map(|img| {
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

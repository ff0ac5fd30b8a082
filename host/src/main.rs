use clap::Parser;

fn main() {
    let cli = stuffed::cli::Cli::parse();
    if let Err(e) = stuffed::cli::run(cli) {
        // One line: the file or tensor and the problem.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("stuffed: error: {msg}");
        std::process::exit(1);
    }
}

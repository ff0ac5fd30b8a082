use clap::Parser;

fn main() {
    // A closed pipe (`stuffed tokenize … | head`) ends the process quietly, as it ends any Unix
    // tool, instead of a panic in println!. Results reach their files before anything is printed;
    // a long run killed this way resumes from its last checkpoint.
    // SAFETY: first thing in main, before any thread exists; SIG_DFL is a valid disposition.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    use clap::error::ErrorKind;
    let cli = match stuffed::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // One line, as every error (clap's usage hint and its blank lines dropped).
            eprintln!("stuffed: error: {}", stuffed::cli::one_line(&e));
            std::process::exit(2);
        }
    };
    // The binary catches SIGINT/SIGTERM during long runs (checkpoint, then stop); the library alone
    // installs no handlers.
    stuffed::interrupt::enable();
    if let Err(e) = stuffed::cli::run(cli) {
        // One line: the file or tensor and the problem.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("stuffed: error: {msg}");
        std::process::exit(1);
    }
}

// The `dysco-migrate` executable: `DyscoMigrate.main()`. The commands and option groups live in the DyscoCLI
// library (as swift-nio keeps its executables thin), where the help snapshot tests reach them. `@main` on the
// command type (not top-level `await DyscoMigrate.main()` in a main.swift, which resolves to the synchronous
// `ParsableCommand.main()` and refuses an asynchronous root command) selects `AsyncParsableCommand.main()`.
import DyscoCLI

@main
extension DyscoMigrate {}

import ArgumentParser

// Placeholder: replaced by the lab work (issue 2, item 4).
struct LabCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "lab", abstract: "Build and tear down a test lab.")
}

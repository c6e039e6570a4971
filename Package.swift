// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "dysco-migrate",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "dysco-migrate", targets: ["dysco-migrate"]),
        // Benchmarks and their load helpers, apart from the product (as swift-nio keeps NIOPerformanceTester).
        .executable(name: "dysco-bench", targets: ["dysco-bench"]),
        .library(name: "DyscoCore", targets: ["DyscoCore"]),
        .library(name: "DyscoAgent", targets: ["DyscoAgent"]),
        .library(name: "ConntrackState", targets: ["ConntrackState"]),
        // The LD_PRELOAD interposer for splicing proxies (HAProxy in TCP mode): .build/release/libdysco-splice.so.
        .library(name: "dysco-splice", type: .dynamic, targets: ["DyscoSplice"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // C shims: one small system-library target per C library.
        .systemLibrary(
            name: "CNetfilterQueue",
            pkgConfig: "libnetfilter_queue",
            providers: [.apt(["libnetfilter-queue-dev", "libmnl-dev"])]
        ),
        .systemLibrary(
            name: "CConntrack",
            pkgConfig: "libnetfilter_conntrack",
            providers: [.apt(["libnetfilter-conntrack-dev", "libmnl-dev"])]
        ),
        .systemLibrary(
            name: "CLibbpf",
            pkgConfig: "libbpf",
            providers: [.apt(["libbpf-dev"])]
        ),
        .systemLibrary(name: "CLinux"),
        // C, no Swift: the LD_PRELOAD library for an unmodified splicing proxy (pipe, pipe2, splice, close
        // interposed) and the paper's `dysco_splice` call; it reports each spliced socket pair to the local agent's
        // control socket (Sources/DyscoSplice/include/dysco_splice.h). No Swift target depends on it.
        .target(
            name: "DyscoSplice",
            cSettings: [.define("_GNU_SOURCE")],
            linkerSettings: [
                .linkedLibrary("dl", .when(platforms: [.linux])),
                .linkedLibrary("pthread", .when(platforms: [.linux])),
                // Preloaded into C programs: no Swift start-up object, so no libswiftCore.so and no rpath to the
                // toolchain (SwiftPM links every product with the Swift driver).
                .unsafeFlags(["-nostartfiles", "-no-toolchain-stdlib-rpath", "-static-stdlib"], .when(platforms: [.linux])),
            ]
        ),

        // errno-carrying syscall helper, network-namespace entry, child processes.
        .target(
            name: "DyscoSystem",
            dependencies: [
                "CLinux",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Pure logic: packet views, checksums, trailer and control-message codecs, session table,
        // PacketProcessor, fast-path script, trust (HMAC). No I/O, testable without root.
        .target(
            name: "DyscoCore",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // The reconfiguration protocol (paper §3) as pure state machines over DyscoCore.
        .target(name: "MigrationCoordinator", dependencies: ["DyscoCore"]),
        // Per-session bounded buffers of the anchors (pure).
        .target(name: "AnchorBuffer", dependencies: ["DyscoCore"]),
        // The Linux edge: NFQUEUE socket, the kernel path (BPF programs and maps), queue rules, control channels,
        // the agent shell.
        .target(
            name: "DyscoAgent",
            dependencies: [
                "DyscoCore", "MigrationCoordinator", "AnchorBuffer",
                "CNetfilterQueue", "CLinux", "DyscoSystem", "DyscoBPF",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .target(
            name: "ConntrackState",
            dependencies: [
                "CConntrack", "DyscoSystem", "DyscoCore",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The BPF datapath's user-space side (issue 16, not wired into the agent yet): loads bpf/dysco.bpf.o
        // (`make bpf`), attaches its tc programs, pins its maps, reads and writes translations and events.
        .target(name: "DyscoBPF", dependencies: ["CLibbpf", "DyscoCore", "DyscoSystem"]),
        // Test labs of network namespaces and `measure` (used by `dysco-migrate lab`/`measure` and the tests;
        // never by the agent, `replace` or `drain` code).
        .target(
            name: "DyscoLab",
            dependencies: [
                "DyscoSystem", "DyscoCore", "DyscoAgent",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            resources: [.copy("Resources/http-server.py"), .copy("Resources/paced-http-server.py")]
        ),
        // The benchmarks (data plane, replace, drain, flood, restore, conntrack state) and their load helpers.
        .target(
            name: "DyscoBench",
            dependencies: [
                "DyscoLab", "DyscoSystem", "DyscoCore", "DyscoAgent", "DyscoBPF", "ConntrackState",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            resources: [.copy("Resources/syn-flood.py"), .copy("Resources/trickle-server.py"),
                        .copy("Resources/trickle-client.py")]
        ),
        // The `dysco-migrate` commands (Sources/DyscoCLI/*Command.swift), the option groups every command shares
        // (Sources/DyscoCLI/Options/: --json, agent address, placement, logging) and the one logger factory.
        .target(
            name: "DyscoCLI",
            dependencies: [
                "DyscoCore", "DyscoAgent", "ConntrackState", "DyscoLab", "DyscoSystem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The `dysco-bench` commands, over DyscoBench; the option groups and the logger factory from DyscoCLI.
        .target(
            name: "DyscoBenchCLI",
            dependencies: [
                "DyscoCLI", "DyscoBench", "DyscoLab", "ConntrackState", "DyscoSystem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Thin executables (as swift-nio's): one file each, `@main extension DyscoMigrate {}` / `@main extension BenchCommand {}`.
        .executableTarget(name: "dysco-migrate", dependencies: ["DyscoCLI"]),
        .executableTarget(name: "dysco-bench", dependencies: ["DyscoBenchCLI"]),
        // Tests mirror targets: one unit-test target per source target with pure logic (no root; `make unit` runs
        // exactly these), plus the root-only IntegrationTests.
        .testTarget(name: "DyscoCoreTests", dependencies: ["DyscoCore"]),
        .testTarget(name: "AnchorBufferTests", dependencies: ["AnchorBuffer"]),
        // Pure: the BPF maps' key/value/event encoding (byte layout, network order); no root, no kernel.
        .testTarget(name: "DyscoBPFTests", dependencies: ["DyscoBPF", "DyscoCore"]),
        // Test support, not a test target: the in-memory network harness (coordinators, simulated network, virtual
        // clock, fake data planes) and the model's trace checker, for any test target that drives reconfigurations.
        .target(name: "MigrationHarness", dependencies: ["MigrationCoordinator", "DyscoCore"], path: "Tests/MigrationHarness"),
        .testTarget(name: "MigrationCoordinatorTests", dependencies: ["MigrationCoordinator", "MigrationHarness", "DyscoCore"]),
        // DyscoBench: the synthetic conntrack entries and state documents the tests share with the benchmarks.
        .testTarget(name: "ConntrackStateTests", dependencies: ["ConntrackState", "DyscoBench"]),
        // Pure: the help screen of every command of both executables against Snapshots/*.txt (read through #filePath).
        .testTarget(
            name: "DyscoCLITests",
            dependencies: [
                "DyscoCLI", "DyscoBenchCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            exclude: ["Snapshots"]
        ),
        .testTarget(
            name: "DyscoLabTests",
            dependencies: ["DyscoLab", "DyscoAgent", "DyscoCore", .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(name: "DyscoBenchTests", dependencies: ["DyscoBench"]),
        // Root only: network namespaces, the built binaries, real agents.
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["DyscoLab", "DyscoBench", "DyscoCore", "DyscoAgent", "ConntrackState", "DyscoSystem", "DyscoBPF"]
        ),
    ],
    swiftLanguageModes: [.v6]
)

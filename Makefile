# dysco-migrate — the two commands a fresh machine needs are `make demo` and `make test` (see README.md).
SWIFT ?= swift
BIN := $(CURDIR)/.build/release/dysco-migrate
# The benchmarks' executable (built beside dysco-migrate, whose agents its labs run).
BENCH := $(CURDIR)/.build/release/dysco-bench
# The BPF datapath's tc programs (bpf/dysco.bpf.c), compiled from source with the Swift toolchain's clang (it has
# the bpf target; any clang ≥ 14 does). No object file is committed. DyscoBPF loads it (docs/BPF.md).
BPF_CLANG ?= $(firstword $(wildcard $(dir $(realpath $(shell command -v $(SWIFT))))clang) clang)
BPF_OBJ := $(CURDIR)/.build/bpf/dysco.bpf.o
BPF_ARCH_INCLUDE := /usr/include/$(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)

.PHONY: setup bpf release deb previous demo test unit verify bench bench-check bench-replace bench-drain bench-soak measure clean-labs

setup:            ## install every system package the project needs (idempotent, apt-get)
	bash scripts/setup.sh

bpf: $(BPF_OBJ)   ## the BPF datapath's tc programs: .build/bpf/dysco.bpf.o from bpf/dysco.bpf.c (clang -target bpf)

$(BPF_OBJ): bpf/dysco.bpf.c Sources/CLibbpf/dysco_bpf.h
	@test -e /usr/include/bpf/bpf_helpers.h || $(MAKE) setup
	mkdir -p $(dir $@)
	$(BPF_CLANG) -O2 -g -target bpf -mcpu=v3 -Wall -Werror -I$(BPF_ARCH_INCLUDE) -c $< -o $@

# --static-swift-stdlib: the Swift runtime and Foundation linked in, as the Debian package needs (`make deb` builds the
# same binary; with one set of flags neither target rebuilds the other's modules). libdysco-splice.so is C only, the
# LD_PRELOAD interposer for splicing proxies (Sources/DyscoSplice); it needs no Swift runtime.
release: setup bpf ## the optimized binaries: dysco-migrate (the agents, the demo, the integration tests), dysco-bench and libdysco-splice.so
	$(SWIFT) build -c release --static-swift-stdlib --product dysco-migrate
	$(SWIFT) build -c release --static-swift-stdlib --product dysco-bench
	$(SWIFT) build -c release --static-swift-stdlib --product dysco-splice

# The Debian package (scripts/build-deb.sh): binary with its resource bundles, systemd units, /etc/dysco-migrate,
# man pages, completions; checked with systemd-analyze verify and lintian. README "Deploying on real hosts".
deb: setup        ## .build/deb/dysco-migrate_<version>_<arch>.deb (dpkg-deb), verified by systemd-analyze and lintian
	SWIFT=$(SWIFT) bash scripts/build-deb.sh

demo: release     ## a 50 MB download through client → fw1 → server; replace fw1 → fw2 halfway; phases, fw2's conntrack entry, sha256; tear down
	DYSCO_BIN=$(BIN) bash scripts/demo.sh

# The previous release's agent, built from its commit on main (tags do not travel with every clone), for the
# rolling-upgrade test (docs/CONTROL-PROTOCOL.md "Versions"). A new release sets both lines to the one before it.
PREVIOUS_RELEASE ?= 0.19.0
PREVIOUS_COMMIT ?= 89086c596ecbe9b1b240d7c10501370847633837
PREVIOUS_BIN := $(CURDIR)/.build/previous/bin/dysco-migrate
previous: setup   ## the previous release's agent ($(PREVIOUS_RELEASE), commit $(PREVIOUS_COMMIT)) in .build/previous/bin, for the rolling-upgrade test
	SWIFT=$(SWIFT) bash scripts/build-previous.sh $(PREVIOUS_RELEASE) $(PREVIOUS_COMMIT)

# --no-parallel: the integration tests block on child processes; in parallel on a 2-core machine they starve
# Swift concurrency's cooperative pool (2 threads) and each other's timing. Serially the suite takes about a minute.
test: release bpf deb previous ## every test: unit (no root) and integration (root, network namespaces; the previous release for the rolling-upgrade test)
	DYSCO_BIN=$(BIN) DYSCO_PREVIOUS_BIN=$(PREVIOUS_BIN) $(SWIFT) test --no-parallel

# The unit-test targets, one per source target with pure logic; every other test target (IntegrationTests) needs root.
# Swift Testing matches --filter against the module-qualified name, Module.Suite/test().
UNIT_TARGETS := DyscoCoreTests|DyscoBPFTests|AnchorBufferTests|MigrationCoordinatorTests|ConntrackStateTests|DyscoLabTests|DyscoBenchTests|DyscoCLITests

unit:             ## only the tests that need no root: the unit-test targets
	$(SWIFT) test --filter '^($(UNIT_TARGETS))\.'

verify: setup     ## model-check the reconfiguration protocol with Spin (model/, docs/VERIFICATION.md): configurations and mutants
	bash model/verify.sh

bench: release    ## data-plane benchmark: kernel forwarding vs the Dysco chain, same invocation
	$(BENCH) dataplane

bench-check: release  ## data-plane benchmark that exits 1 when a fast-path figure falls below its floor (connect overhead < 1 ms/box, sessions/s ≥ 0.2, bulk ≥ 0.8 of kernel)
	$(BENCH) dataplane --check

bench-replace: release  ## replace benchmark: 100 live paced sessions fw1 → fw2, stateful then stateless, vs the prototype-style state transfer
	$(BENCH) replace --both

bench-drain: release  ## drain benchmark: 1,000 then 10,000 live sessions drained fw1 → fw2 (batched), every stream byte checked
	$(BENCH) drain --sessions 1000
	$(BENCH) drain --sessions 10000

bench-soak: release  ## soak: live sessions moved fw1 ⇄ fw2 1,000 times under 30 % control-message loss; every stream checked, agents' RSS and tables sampled (RSS slope)
	$(BENCH) soak

measure: release  ## 20 live sessions in 2 bundles, one moved fw1 → fw2 mid-run, stateful and stateless: latency, goodput, plots (MEASURE_ARGS=...)
	$(BIN) measure --both $(MEASURE_ARGS)

// Package testenv starts the real dependencies that fleetbroker's tests run
// against — a redis-server and a Vault dev server on loopback — once per test
// binary. For fault tests it also starts, per test, servers the test may
// break: a Vault server on file storage that can be stopped, sealed and
// restarted (VaultFile); a redis-server with AOF that can be killed and
// restarted (RedisRestartable); a Sentinel deployment whose master can be
// crashed and failed over (RedisSentinelFailover); and fleetbroker itself
// as child processes (StartProcess) from binaries of this working tree or of
// an earlier release in git history (BuildWorkingTree, BuildAtCommit). A
// missing dependency is a test failure, never a skip: in CI the dependency
// must be installed by .ci/run.
//
// The processes themselves are started by internal/testenv/launch, which
// has no testing dependency and is shared with the benchmark; this package
// adds the sharing per test binary and the test failures.
package testenv

import (
	"os"
	"testing"
)

// Main runs a package's tests and then stops the servers they started. Use
// it from TestMain: func TestMain(m *testing.M) { testenv.Main(m) }.
func Main(m *testing.M) {
	code := m.Run()
	StopRedis()
	StopVault()
	removeBuilds()
	os.Exit(code)
}

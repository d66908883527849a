package main

import (
	"context"
	"flag"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"

	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
)

// TestComposeWiring loads docker-compose.yml the way `docker compose` does
// (no Docker engine runs here) and checks that it wires what the services
// need, with every FLEETBROKER_* variable naming a real flag.
func TestComposeWiring(t *testing.T) {
	opts, err := cli.NewProjectOptions([]string{"../../docker-compose.yml"}, cli.WithWorkingDirectory("../.."), cli.WithName("fleetbroker"), cli.WithOsEnv)
	if err != nil {
		t.Fatal(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml does not load: %v", err)
	}
	svc := func(name string) types.ServiceConfig {
		s, err := project.GetService(name)
		if err != nil {
			t.Fatalf("service %q missing: %v", name, err)
		}
		return s
	}

	redis := svc("redis")
	if !strings.Contains(strings.Join(redis.Command, " "), "--appendonly yes") {
		t.Errorf("redis must persist with AOF, command = %v", redis.Command)
	}
	if redis.HealthCheck == nil {
		t.Error("redis needs a health check for depends_on")
	}
	assertComposeVault(t, project)
	init := svc("vault-init")
	script, err := os.ReadFile("../../deploy/vault/init.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"secrets enable transit", "derived=true", "disable_upsert=true", "for key in fleetbroker fleetbroker-gateway",
		`POLICY_DIR="${POLICY_DIR:-/policies}"`, // where compose mounts deploy/vault; TestVaultInitScript runs the script
		`policy write fleetbroker-credentials "$POLICY_DIR/credentials.hcl"`, `policy write fleetbroker-gateway "$POLICY_DIR/gateway.hcl"`} {
		if !strings.Contains(string(script), want) {
			t.Errorf("deploy/vault/init.sh does not %q", want)
		}
	}
	tokenIDs := map[string]string{"credentials": "CREDENTIALS_TOKEN_ID", "gateway": "GATEWAY_TOKEN_ID"}

	tests := []struct {
		service string
		command string
		deps    map[string]string
		env     map[string]string
		flags   func() *flag.FlagSet
	}{
		{
			service: "credentials", command: "credentials",
			deps: map[string]string{"vault": types.ServiceConditionHealthy, "vault-init": types.ServiceConditionHealthy, "redis": types.ServiceConditionHealthy},
			env: map[string]string{
				"FLEETBROKER_VAULT_ADDR":        "http://vault:8200",
				"FLEETBROKER_REDIS_ADDR":        "redis:6379",
				"FLEETBROKER_VAULT_TRANSIT_KEY": "fleetbroker",
				"FLEETBROKER_ALLOWED_UPSTREAMS": "simulator:7480",
			},
			flags: func() *flag.FlagSet { fs, _, _, _ := credentialsFlags(); return fs },
		},
		{
			service: "gateway", command: "gateway",
			deps: map[string]string{"vault": types.ServiceConditionHealthy, "vault-init": types.ServiceConditionHealthy, "redis": types.ServiceConditionHealthy, "credentials": types.ServiceConditionHealthy},
			env: map[string]string{
				"FLEETBROKER_VAULT_ADDR":        "http://vault:8200",
				"FLEETBROKER_REDIS_ADDR":        "redis:6379",
				"FLEETBROKER_VAULT_TRANSIT_KEY": "fleetbroker-gateway",
				"FLEETBROKER_CREDENTIALS_ADDR":  "credentials:7401",
				"FLEETBROKER_ALLOWED_UPSTREAMS": "simulator:7480",
			},
			flags: func() *flag.FlagSet { fs, _, _, _ := gatewayFlags(); return fs },
		},
		{service: "simulator", command: "simulator"},
	}
	for _, tt := range tests {
		t.Run(tt.service, func(t *testing.T) {
			s := svc(tt.service)
			if s.Build == nil || len(s.Command) == 0 || s.Command[0] != tt.command {
				t.Errorf("%s must build this repo and run %q, got build %v command %v", tt.service, tt.command, s.Build, s.Command)
			}
			for dep, cond := range tt.deps {
				if got := s.DependsOn[dep].Condition; got != cond {
					t.Errorf("%s depends_on %s: condition %q, want %q", tt.service, dep, got, cond)
				}
			}
			for k, want := range tt.env {
				if got := s.Environment[k]; got == nil || *got != want {
					t.Errorf("%s env %s = %v, want %q", tt.service, k, got, want)
				}
			}
			if tt.flags != nil {
				assertEnvNamesFlags(t, tt.service, s.Environment, tt.flags())
				assertStopGrace(t, s, tt.flags())
				// The token vault-init makes for the service is the one it uses.
				want, got := init.Environment[tokenIDs[tt.service]], s.Environment["FLEETBROKER_VAULT_TOKEN"]
				if want == nil || got == nil || *want != *got {
					t.Errorf("%s uses Vault token %v, vault-init makes %v", tt.service, got, want)
				}
			}
		})
	}
	for _, policy := range []string{"credentials.hcl", "gateway.hcl"} {
		if _, err := os.Stat("../../deploy/vault/" + policy); err != nil {
			t.Errorf("vault-init writes a policy that does not exist: %v", err)
		}
	}
	assertComposePolicy(t, svc("credentials"), svc("gateway"))
	assertComposeHandleKeys(t, svc("credentials"), svc("gateway"))
}

// assertComposeHandleKeys checks that both services read the same handle
// key file, and that it loads: a gateway with other keys than the
// credentials service refuses every handle.
func assertComposeHandleKeys(t *testing.T, services ...types.ServiceConfig) {
	t.Helper()
	sources := map[string]bool{}
	for _, s := range services {
		file := s.Environment["FLEETBROKER_HANDLE_KEY_FILE"]
		if file == nil {
			t.Fatalf("%s has no FLEETBROKER_HANDLE_KEY_FILE", s.Name)
		}
		source := ""
		for _, v := range s.Volumes {
			if v.Target == *file {
				source = v.Source
			}
		}
		if source == "" {
			t.Fatalf("%s: FLEETBROKER_HANDLE_KEY_FILE names no mounted file", s.Name)
		}
		if _, err := handle.LoadKeys(source); err != nil {
			t.Fatalf("%s: %v", s.Name, err)
		}
		sources[source] = true
	}
	if len(sources) != 1 {
		t.Errorf("the services mount different handle key files %v", sources)
	}
}

// assertComposePolicy checks that the policy mounted into the credentials
// service loads and lets the gateway, with the API key compose gives it,
// resolve sessions.
func assertComposePolicy(t *testing.T, creds, gateway types.ServiceConfig) {
	t.Helper()
	var source string
	for _, v := range creds.Volumes {
		if v.Target == *creds.Environment["FLEETBROKER_POLICY"] {
			source = v.Source
		}
	}
	if source == "" {
		t.Fatal("FLEETBROKER_POLICY names no mounted file")
	}
	pol, err := policy.Load(source)
	if err != nil {
		t.Fatalf("compose policy does not load: %v", err)
	}
	key := gateway.Environment["FLEETBROKER_CREDENTIALS_API_KEY"]
	if key == nil {
		t.Fatal("the gateway has no API key towards the credentials service")
	}
	principal, ok := pol.PrincipalForAPIKey(*key)
	if !ok || !pol.Allowed(principal, policy.SessionsResolve, "demo") {
		t.Fatalf("the gateway's key (principal %q) may not resolve sessions", principal)
	}
}

// assertEnvNamesFlags fails for a FLEETBROKER_* variable that no flag reads.
func assertEnvNamesFlags(t *testing.T, service string, env types.MappingWithEquals, fs *flag.FlagSet) {
	t.Helper()
	known := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) { known[envName(f.Name)] = true })
	for k := range env {
		if strings.HasPrefix(k, "FLEETBROKER_") && !known[k] {
			t.Errorf("%s: %s matches no flag of its subcommand", service, k)
		}
	}
}

// assertComposeVault: Vault is a real server on file storage in a named
// volume (a dev server keeps everything in memory, and a restart orphans
// every ciphertext in Redis), and vault-init initializes and unseals it,
// and keeps running to unseal it again after every restart.
func assertComposeVault(t *testing.T, project *types.Project) {
	t.Helper()
	vault, err := project.GetService("vault")
	if err != nil {
		t.Fatal(err)
	}
	if cmd := strings.Join(vault.Command, " "); cmd != "server" || strings.Contains(cmd, "-dev") {
		t.Errorf("vault command %q, want a real server (not -dev)", cmd)
	}
	if vault.HealthCheck == nil || !slices.Contains(vault.HealthCheck.Test, "status") {
		t.Error("vault needs a health check that fails while sealed (vault status)")
	}
	mounts := map[string]types.ServiceVolumeConfig{}
	for _, v := range vault.Volumes {
		mounts[v.Target] = v
	}
	data, ok := mounts["/vault/file"]
	if !ok || data.Type != types.VolumeTypeVolume || project.Volumes[data.Source].Name == "" {
		t.Errorf("vault's storage /vault/file is not a named volume: %+v", data)
	}
	conf, ok := mounts["/vault/config/vault.hcl"]
	if !ok {
		t.Fatal("vault has no configuration file mounted at /vault/config/vault.hcl")
	}
	hcl, err := os.ReadFile(conf.Source)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`storage "file"`, `path = "/vault/file"`, `address     = "0.0.0.0:8200"`} {
		if !strings.Contains(string(hcl), want) {
			t.Errorf("%s lacks %s", conf.Source, want)
		}
	}
	if vault.Restart != types.RestartPolicyUnlessStopped {
		t.Errorf("vault restart policy %q, want %q", vault.Restart, types.RestartPolicyUnlessStopped)
	}

	init, err := project.GetService("vault-init")
	if err != nil {
		t.Fatal(err)
	}
	// Vault is unhealthy until vault-init unseals it: waiting for healthy
	// would deadlock.
	if dep := init.DependsOn["vault"]; dep.Condition != types.ServiceConditionStarted {
		t.Errorf("vault-init depends_on vault: %q, want %q", dep.Condition, types.ServiceConditionStarted)
	}
	env := func(k string) string {
		if v := init.Environment[k]; v != nil {
			return *v
		}
		return ""
	}
	if env("VAULT_WATCH_INTERVAL") == "" || init.Restart != types.RestartPolicyUnlessStopped {
		t.Errorf("vault-init must keep running (VAULT_WATCH_INTERVAL, restart unless-stopped) to unseal a restarted Vault; got %q, %q",
			env("VAULT_WATCH_INTERVAL"), init.Restart)
	}
	if init.HealthCheck == nil || !strings.Contains(strings.Join(init.HealthCheck.Test, " "), "-f /tmp/vault-ready") {
		t.Error("vault-init needs a health check on /tmp/vault-ready (what init.sh creates once Vault is set up)")
	}
	keysKept := false
	for _, v := range init.Volumes {
		if v.Target == env("VAULT_INIT_DIR") && v.Type == types.VolumeTypeVolume {
			keysKept = true
		}
	}
	if !keysKept {
		t.Errorf("VAULT_INIT_DIR %q is not a named volume: the unseal key would be lost with the container", env("VAULT_INIT_DIR"))
	}
	for _, name := range []string{"vault-data", "vault-init", "redis-data"} {
		if _, ok := project.Volumes[name]; !ok {
			t.Errorf("volume %s is not declared", name)
		}
	}
}

// assertStopGrace: docker compose stop waits stop_grace_period (default
// 10s) before SIGKILL; the drain needs --drain-period plus --shutdown-grace.
func assertStopGrace(t *testing.T, s types.ServiceConfig, fs *flag.FlagSet) {
	t.Helper()
	fs.SetOutput(io.Discard)
	if err := fs.Parse(s.Command[1:]); err != nil {
		t.Fatal(err)
	}
	for k, v := range s.Environment {
		if f := strings.TrimPrefix(k, "FLEETBROKER_"); f != k && v != nil {
			_ = fs.Set(strings.ToLower(strings.ReplaceAll(f, "_", "-")), *v)
		}
	}
	var need time.Duration
	for _, name := range []string{"drain-period", "shutdown-grace"} {
		need += fs.Lookup(name).Value.(flag.Getter).Get().(time.Duration)
	}
	grace := 10 * time.Second
	if s.StopGracePeriod != nil {
		grace = time.Duration(*s.StopGracePeriod)
	}
	if grace <= need {
		t.Errorf("%s: stop_grace_period %s does not exceed --drain-period plus --shutdown-grace (%s): docker compose stop would SIGKILL the drain", s.Name, grace, need)
	}
}

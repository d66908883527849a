package main

import (
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

const istioDir = "../../deploy/istio"

// istioObject is the part of an Istio or Kubernetes object the checks read.
type istioObject struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name      string `yaml:"name"`
		Namespace string `yaml:"namespace"`
	} `yaml:"metadata"`
	Spec yaml.Node `yaml:"spec"`
	Data map[string]string
}

type authorizationPolicy struct {
	Selector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"selector"`
	Action string `yaml:"action"`
	Rules  []struct {
		From []struct {
			Source struct {
				Principals    []string `yaml:"principals"`
				NotPrincipals []string `yaml:"notPrincipals"`
				Namespaces    []string `yaml:"namespaces"`
			} `yaml:"source"`
		} `yaml:"from"`
		To []struct {
			Operation struct {
				Ports   []string `yaml:"ports"`
				Methods []string `yaml:"methods"`
				Paths   []string `yaml:"paths"`
			} `yaml:"operation"`
		} `yaml:"to"`
	} `yaml:"rules"`
}

type virtualService struct {
	Hosts    []string `yaml:"hosts"`
	Gateways []string `yaml:"gateways"`
	HTTP     []struct {
		Match []struct {
			URI    map[string]string `yaml:"uri"`
			Method map[string]string `yaml:"method"`
		} `yaml:"match"`
		Route []struct {
			Destination struct {
				Host string `yaml:"host"`
				Port struct {
					Number int `yaml:"number"`
				} `yaml:"port"`
			} `yaml:"destination"`
		} `yaml:"route"`
		Retries *struct {
			Attempts int    `yaml:"attempts"`
			RetryOn  string `yaml:"retryOn"`
		} `yaml:"retries"`
	} `yaml:"http"`
}

// jsonPatchOp is one JSON6902 operation of a kustomize patch file.
type jsonPatchOp struct {
	Op    string    `yaml:"op"`
	Path  string    `yaml:"path"`
	Value yaml.Node `yaml:"value"`
}

func loadIstioObjects(t *testing.T, file string) []istioObject {
	t.Helper()
	f, err := os.Open(filepath.Join(istioDir, file))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []istioObject
	dec := yaml.NewDecoder(f)
	for {
		var o istioObject
		if err := dec.Decode(&o); err != nil {
			if err.Error() == "EOF" {
				return out
			}
			t.Fatalf("%s: %v", file, err)
		}
		out = append(out, o)
	}
}

func decodeSpec[T any](t *testing.T, o istioObject) T {
	t.Helper()
	var v T
	if err := o.Spec.Decode(&v); err != nil {
		t.Fatalf("%s %s: %v", o.Kind, o.Metadata.Name, err)
	}
	return v
}

// meshPrincipal is the Istio principal of a service account of the
// fleetbroker namespace (trust domain cluster.local).
func meshPrincipal(sa string) string { return "cluster.local/ns/fleetbroker/sa/" + sa }

// internalMethods are the credentials service's RPCs only the gateway may
// call: those whose policy action is sessions.resolve.
func internalMethods() []string {
	var out []string
	for m, a := range credentials.Actions {
		if a == policy.SessionsResolve {
			out = append(out, m)
		}
	}
	slices.Sort(out)
	return out
}

// servedMethods lists every method of the given service descriptors.
func servedMethods(descs ...grpc.ServiceDesc) []string {
	var out []string
	for _, d := range descs {
		for _, m := range d.Methods {
			out = append(out, "/"+d.ServiceName+"/"+m.MethodName)
		}
		for _, s := range d.Streams {
			out = append(out, "/"+d.ServiceName+"/"+s.StreamName)
		}
	}
	slices.Sort(out)
	return out
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// TestIstioManifests checks deploy/istio against the code: the internal
// RPCs are open to the gateway's service account alone, every other RPC of
// the credentials service is listed for named callers, the gateway's paths
// are its methods, mesh retries stay inside the retry budget, and the
// sidecar-mode patches give both services flags their real flag sets accept.
func TestIstioManifests(t *testing.T) {
	gatewaySA := gatewayServiceAccount(t)
	gw := meshPrincipal(gatewaySA)
	internal := internalMethods()
	credentialMethods := servedMethods(credentialsv1.CredentialService_ServiceDesc, credentialsv1.SessionService_ServiceDesc)

	t.Run("peer authentication", func(t *testing.T) {
		objs := loadIstioObjects(t, "peer-authentication.yaml")
		if len(objs) != 1 || objs[0].Kind != "PeerAuthentication" || objs[0].Metadata.Namespace != "fleetbroker" {
			t.Fatalf("want one namespace-wide PeerAuthentication in fleetbroker, got %+v", objs)
		}
		spec := decodeSpec[struct {
			Selector any `yaml:"selector"`
			MTLS     struct {
				Mode string `yaml:"mode"`
			} `yaml:"mtls"`
		}](t, objs[0])
		if spec.Selector != nil || spec.MTLS.Mode != "STRICT" {
			t.Errorf("mTLS mode %q with selector %v; want STRICT for the whole namespace", spec.MTLS.Mode, spec.Selector)
		}
	})

	policies := map[string]authorizationPolicy{}
	for _, o := range loadIstioObjects(t, "authorization-policies.yaml") {
		if o.Kind != "AuthorizationPolicy" || o.Metadata.Namespace != "fleetbroker" {
			t.Fatalf("unexpected %s %s in namespace %q", o.Kind, o.Metadata.Name, o.Metadata.Namespace)
		}
		policies[o.Metadata.Name] = decodeSpec[authorizationPolicy](t, o)
	}

	t.Run("internal RPCs denied to all but the gateway", func(t *testing.T) {
		deny, ok := policies["credentials-internal-rpcs"]
		if !ok || deny.Action != "DENY" || deny.Selector.MatchLabels["app.kubernetes.io/name"] != "credentials" || len(deny.Rules) != 1 {
			t.Fatalf("want a DENY policy on the credentials pods with one rule, got %+v", deny)
		}
		r := deny.Rules[0]
		if len(r.From) != 1 || !slices.Equal(r.From[0].Source.NotPrincipals, []string{gw}) {
			t.Errorf("DENY applies to everyone but %v, want everyone but %s", r.From, gw)
		}
		if len(r.To) != 1 || !slices.Equal(sorted(r.To[0].Operation.Paths), internal) {
			t.Errorf("DENY covers %v, want exactly the sessions.resolve RPCs %v", r.To, internal)
		}
	})

	t.Run("credentials callers", func(t *testing.T) {
		allow, ok := policies["credentials-callers"]
		if !ok || allow.Action != "ALLOW" || allow.Selector.MatchLabels["app.kubernetes.io/name"] != "credentials" {
			t.Fatalf("want an ALLOW policy on the credentials pods, got %+v", allow)
		}
		listed := map[string][]string{} // path → principals allowed
		for _, r := range allow.Rules {
			for _, to := range r.To {
				if !slices.Equal(to.Operation.Ports, []string{"7401"}) {
					t.Errorf("rule for %v opens ports %v, want only the gRPC port 7401", to.Operation.Paths, to.Operation.Ports)
				}
				for _, p := range to.Operation.Paths {
					for _, from := range r.From {
						if len(from.Source.Namespaces) > 0 {
							t.Errorf("path %s opened to whole namespaces %v: name the callers", p, from.Source.Namespaces)
						}
						listed[p] = append(listed[p], from.Source.Principals...)
					}
				}
			}
		}
		for _, m := range internal {
			if !slices.Equal(listed[m], []string{gw}) {
				t.Errorf("%s allowed to %v, want only the gateway %s", m, listed[m], gw)
			}
		}
		for _, m := range credentialMethods {
			if slices.Contains(internal, m) {
				continue
			}
			if len(listed[m]) == 0 {
				t.Errorf("%s is served but no caller may reach it: list it for the named callers or decide it is internal", m)
			}
			if slices.Contains(listed[m], "*") || slices.Contains(listed[m], gw) {
				t.Errorf("%s allowed to %v: callers must be named, and the gateway needs none of the caller RPCs", m, listed[m])
			}
		}
		for p, who := range listed {
			if strings.HasPrefix(p, "/grpc.health.v1.Health/") {
				continue
			}
			if !slices.Contains(credentialMethods, p) {
				t.Errorf("ALLOW lists %s (for %v), which the credentials service does not serve", p, who)
			}
		}
	})

	t.Run("gateway callers", func(t *testing.T) {
		allow, ok := policies["gateway-callers"]
		if !ok || allow.Action != "ALLOW" || allow.Selector.MatchLabels["app.kubernetes.io/name"] != "gateway" {
			t.Fatalf("want an ALLOW policy on the gateway pods, got %+v", allow)
		}
		var paths []string
		for _, r := range allow.Rules {
			for _, to := range r.To {
				for _, p := range to.Operation.Paths {
					if !strings.HasPrefix(p, "/grpc.health.v1.Health/") {
						paths = append(paths, p)
					}
				}
			}
		}
		if !slices.Equal(sorted(paths), sorted(gateway.SessionMethods)) {
			t.Errorf("gateway paths %v, want its methods %v", sorted(paths), sorted(gateway.SessionMethods))
		}
	})

	t.Run("mesh retries inside the retry budget", func(t *testing.T) {
		hosts := map[string]bool{}
		for _, o := range append(loadIstioObjects(t, "traffic.yaml"), loadIstioObjects(t, "authorize-route.yaml")...) {
			if o.Kind != "VirtualService" {
				continue
			}
			vs := decodeSpec[virtualService](t, o)
			for _, h := range vs.Hosts {
				hosts[h] = true
			}
			for _, route := range vs.HTTP {
				if route.Retries == nil {
					t.Errorf("VirtualService %s: no retries set, so Istio's default (UNAVAILABLE and more, twice) applies", o.Metadata.Name)
					continue
				}
				for _, on := range strings.Split(route.Retries.RetryOn, ",") {
					// Only failures that never reached a replica: they cost
					// no upstream request.
					if on != "connect-failure" && on != "refused-stream" {
						t.Errorf("VirtualService %s retries on %q, outside the retry budget", o.Metadata.Name, on)
					}
				}
				if route.Retries.Attempts > 2 {
					t.Errorf("VirtualService %s: %d attempts", o.Metadata.Name, route.Retries.Attempts)
				}
			}
		}
		for _, h := range []string{"credentials.fleetbroker.svc.cluster.local", "gateway.fleetbroker.svc.cluster.local"} {
			if !hosts[h] {
				t.Errorf("no VirtualService for %s: Istio's default retries apply to it", h)
			}
		}
	})

	t.Run("authorization callback", func(t *testing.T) {
		checkCallbackRoute(t, policies)
	})

	t.Run("mesh policy names the same identities", func(t *testing.T) {
		objs := loadIstioObjects(t, "policy-mesh.yaml")
		if len(objs) != 1 {
			t.Fatalf("policy-mesh.yaml: %d objects", len(objs))
		}
		pol, err := policy.Parse([]byte(objs[0].Data["policy.yaml"]), "yaml")
		if err != nil {
			t.Fatalf("policy-mesh.yaml: %v", err)
		}
		if !pol.AllowedAnyTenant("spiffe://"+gw, policy.SessionsResolve) {
			t.Errorf("the mesh policy does not grant sessions.resolve to spiffe://%s", gw)
		}
		for p, rule := range map[string]string{"spiffe://cluster.local/ns/billing/sa/api": "the example caller"} {
			if !pol.Allowed(p, policy.SessionsIssue, "acme") {
				t.Errorf("the mesh policy does not grant %s (%s) what authorization-policies.yaml lets it reach", p, rule)
			}
		}
	})

	t.Run("sidecar-mode patches", func(t *testing.T) {
		checkSidecarPatch(t, "credentials-sidecar-mtls.yaml", "credentials", func(args []string) {
			fs, cfg, _, _ := credentialsFlags()
			if err := parse(fs, args); err != nil {
				t.Fatalf("credentials args %v: %v", args, err)
			}
			checkSidecarSecurity(t, "credentials", cfg.Security.Insecure, cfg.Security.TrustedHeader, cfg.Security.TrustedProxies, cfg.Security.TLSCert+cfg.Security.TLSClientCA)
			if cfg.Security.PolicyFile == "" || cfg.HandleKeyFile == "" {
				t.Error("credentials in the mesh lost --policy or --handle-key-file")
			}
			// The callback keeps the base manifest's settings; behind the
			// sidecar it has no certificate of its own (--insecure).
			base, _, _, _ := credentialsFlags()
			if err := parse(base, baseArgs(t, "credentials")[1:]); err != nil {
				t.Fatal(err)
			}
			if a, b := cfg.Authorize, base.Lookup; a.Listen != b("authorize-listen").Value.String() ||
				a.PublicURL != b("public-url").Value.String() || a.ReturnURLs != b("authorize-return-urls").Value.String() || a.TLSCert != "" {
				t.Errorf("credentials in the mesh: callback %+v, want the base manifest's --authorize-listen, --public-url and --authorize-return-urls without a certificate", a)
			}
		})
		checkSidecarPatch(t, "gateway-sidecar-mtls.yaml", "gateway", func(args []string) {
			fs, cfg, _, _ := gatewayFlags()
			if err := parse(fs, args); err != nil {
				t.Fatalf("gateway args %v: %v", args, err)
			}
			checkSidecarSecurity(t, "gateway", cfg.Security.Insecure, cfg.Security.TrustedHeader, cfg.Security.TrustedProxies, cfg.Security.TLSCert+cfg.Security.TLSClientCA)
			if !cfg.CredentialsInsecure || cfg.CredentialsTLS.CAFile != "" || cfg.CredentialsAPIKey != "" {
				t.Error("the gateway must dial the credentials service through its sidecar (--credentials-insecure, no certificate or API key): the mesh identity is its service account")
			}
			if cfg.HandleKeyFile == "" {
				t.Error("gateway in the mesh lost --handle-key-file")
			}
		})
	})

	t.Run("kustomization", func(t *testing.T) {
		data, err := os.ReadFile(filepath.Join(istioDir, "kustomization.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var k struct {
			Resources []string `yaml:"resources"`
			Patches   []struct {
				Path  string `yaml:"path"`
				Patch string `yaml:"patch"`
			} `yaml:"patches"`
		}
		if err := yaml.Unmarshal(data, &k); err != nil {
			t.Fatal(err)
		}
		files, _ := filepath.Glob(filepath.Join(istioDir, "*.yaml"))
		used := map[string]bool{"kustomization.yaml": true}
		for _, r := range k.Resources {
			used[r] = true
		}
		deletesIngress := false
		for _, p := range k.Patches {
			used[p.Path] = true
			deletesIngress = deletesIngress || (strings.Contains(p.Patch, "$patch: delete") && strings.Contains(p.Patch, "kind: Ingress") &&
				strings.Contains(p.Patch, "name: credentials-authorize"))
		}
		if !deletesIngress {
			t.Error("the overlay keeps the nginx Ingress of the callback: in the mesh its route is the ingress gateway's (authorize-route.yaml)")
		}
		if !used["../kubernetes"] {
			t.Error("the overlay does not build on ../kubernetes")
		}
		for _, f := range files {
			if !used[filepath.Base(f)] {
				t.Errorf("%s is in deploy/istio but not in its kustomization", filepath.Base(f))
			}
		}
	})
}

// ingressGatewayPrincipal is the identity of Istio's ingress gateway
// (istioctl's default install).
const ingressGatewayPrincipal = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"

// checkCallbackRoute: the browser-facing callback port is open to the
// ingress gateway alone, for GET of the callback path alone; the ingress
// gateway routes only that path of the --public-url host to it, over a
// Service the sidecar speaks HTTP on; the credentials sidecars record no
// request URL.
func checkCallbackRoute(t *testing.T, policies map[string]authorizationPolicy) {
	t.Helper()
	port := containerPort(t, "credentials", "authorize")
	pol, ok := policies["credentials-authorize-callback"]
	if !ok || pol.Action != "ALLOW" || pol.Selector.MatchLabels["app.kubernetes.io/name"] != "credentials" || len(pol.Rules) != 1 {
		t.Fatalf("want one ALLOW rule for the callback on the credentials pods, got %+v", pol)
	}
	r := pol.Rules[0]
	if len(r.From) != 1 || !slices.Equal(r.From[0].Source.Principals, []string{ingressGatewayPrincipal}) || len(r.From[0].Source.Namespaces) > 0 {
		t.Errorf("the callback is open to %+v, want the ingress gateway %s only", r.From, ingressGatewayPrincipal)
	}
	if len(r.To) != 1 || !slices.Equal(r.To[0].Operation.Ports, []string{port}) || !slices.Equal(r.To[0].Operation.Methods, []string{"GET"}) ||
		!slices.Equal(r.To[0].Operation.Paths, []string{credentials.CallbackPath + "*"}) {
		t.Errorf("the callback rule opens %+v, want GET %s* on port %s only", r.To, credentials.CallbackPath, port)
	}
	for name, p := range policies {
		if name == "credentials-authorize-callback" {
			continue
		}
		for _, rule := range p.Rules {
			for _, to := range rule.To {
				if slices.Contains(to.Operation.Ports, port) || (p.Action == "ALLOW" && len(to.Operation.Ports) == 0) {
					t.Errorf("policy %s opens the callback port %s (or every port) to %+v", name, port, rule.From)
				}
			}
		}
	}

	fs, _, _, _ := credentialsFlags()
	if err := parse(fs, baseArgs(t, "credentials")[1:]); err != nil {
		t.Fatal(err)
	}
	public, err := url.Parse(fs.Lookup("public-url").Value.String())
	if err != nil || public.Host == "" {
		t.Fatalf("base manifest --public-url: %v", err)
	}
	objs := loadIstioObjects(t, "authorize-route.yaml")
	kinds := map[string]istioObject{}
	for _, o := range objs {
		if o.Metadata.Namespace != "fleetbroker" {
			t.Errorf("%s %s in namespace %q", o.Kind, o.Metadata.Name, o.Metadata.Namespace)
		}
		kinds[o.Kind] = o
	}
	gw := decodeSpec[struct {
		Servers []struct {
			Port struct {
				Protocol string `yaml:"protocol"`
			} `yaml:"port"`
			TLS struct {
				Mode string `yaml:"mode"`
			} `yaml:"tls"`
			Hosts []string `yaml:"hosts"`
		} `yaml:"servers"`
	}](t, kinds["Gateway"])
	if len(gw.Servers) != 1 || gw.Servers[0].Port.Protocol != "HTTPS" || gw.Servers[0].TLS.Mode != "SIMPLE" || !slices.Equal(gw.Servers[0].Hosts, []string{public.Host}) {
		t.Errorf("Gateway %s: %+v, want one HTTPS server for %s", kinds["Gateway"].Metadata.Name, gw.Servers, public.Host)
	}
	vs := decodeSpec[virtualService](t, kinds["VirtualService"])
	if !slices.Equal(vs.Hosts, []string{public.Host}) || !slices.Equal(vs.Gateways, []string{kinds["Gateway"].Metadata.Name}) || len(vs.HTTP) != 1 {
		t.Fatalf("VirtualService: hosts %v gateways %v with %d routes, want %s through the Gateway, one route", vs.Hosts, vs.Gateways, len(vs.HTTP), public.Host)
	}
	route := vs.HTTP[0]
	if len(route.Match) != 1 || !maps.Equal(route.Match[0].URI, map[string]string{"prefix": credentials.CallbackPath}) ||
		!maps.Equal(route.Match[0].Method, map[string]string{"exact": "GET"}) {
		t.Errorf("the route matches %+v, want GET of the prefix %s only", route.Match, credentials.CallbackPath)
	}
	svc, svcPort := callbackService(t)
	if len(route.Route) != 1 || route.Route[0].Destination.Host != svc+".fleetbroker.svc.cluster.local" || route.Route[0].Destination.Port.Number != svcPort {
		t.Errorf("the route goes to %+v, want %s port %d", route.Route, svc, svcPort)
	}
	tel := decodeSpec[struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		AccessLogging []struct {
			Disabled bool `yaml:"disabled"`
		} `yaml:"accessLogging"`
		Tracing []struct {
			DisableSpanReporting bool `yaml:"disableSpanReporting"`
		} `yaml:"tracing"`
	}](t, kinds["Telemetry"])
	if tel.Selector.MatchLabels["app.kubernetes.io/name"] != "credentials" || len(tel.AccessLogging) != 1 || !tel.AccessLogging[0].Disabled ||
		len(tel.Tracing) != 1 || !tel.Tracing[0].DisableSpanReporting {
		t.Errorf("Telemetry %+v: want the credentials sidecars' access log and spans off (the callback URL holds the token)", tel)
	}
}

// baseArgs returns the args of service's container in deploy/kubernetes.
func baseArgs(t *testing.T, service string) []string {
	t.Helper()
	containers, _ := baseStatefulSet(t, service)["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)["containers"].([]any)
	if len(containers) == 0 {
		t.Fatalf("%s: no containers", service)
	}
	var args []string
	for _, a := range containers[0].(map[string]any)["args"].([]any) {
		args = append(args, a.(string))
	}
	return args
}

// containerPort returns the number of service's container port name.
func containerPort(t *testing.T, service, name string) string {
	t.Helper()
	containers, _ := baseStatefulSet(t, service)["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)["containers"].([]any)
	for _, p := range containers[0].(map[string]any)["ports"].([]any) {
		if p := p.(map[string]any); p["name"] == name {
			return strconv.Itoa(p["containerPort"].(int))
		}
	}
	t.Fatalf("%s: no container port %q", service, name)
	return ""
}

// callbackService returns the name and port of the Service in
// deploy/kubernetes/authorize.yaml.
func callbackService(t *testing.T) (string, int) {
	t.Helper()
	f, err := os.Open("../../deploy/kubernetes/authorize.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	for {
		var doc struct {
			Kind     string `yaml:"kind"`
			Metadata struct {
				Name string `yaml:"name"`
			} `yaml:"metadata"`
			Spec struct {
				Ports []struct {
					Port int `yaml:"port"`
				} `yaml:"ports"`
			} `yaml:"spec"`
		}
		if err := dec.Decode(&doc); err != nil {
			t.Fatalf("no Service in authorize.yaml: %v", err)
		}
		if doc.Kind == "Service" && len(doc.Spec.Ports) == 1 {
			return doc.Metadata.Name, doc.Spec.Ports[0].Port
		}
	}
}

// checkSidecarSecurity: plaintext behind the sidecar, the identity from
// x-forwarded-client-cert believed only from the sidecar's address, and no
// TLS of the service's own.
func checkSidecarSecurity(t *testing.T, name string, insecure bool, header, proxies, tls string) {
	t.Helper()
	if !insecure || header != "x-forwarded-client-cert" || proxies != "127.0.0.6/32" || tls != "" {
		t.Errorf("%s: --insecure=%v --trusted-header=%q --trusted-proxies=%q tls=%q; want the sidecar's XFCC believed from 127.0.0.6/32 and no TLS of its own",
			name, insecure, header, proxies, tls)
	}
}

// checkSidecarPatch checks one sidecar-mode patch: its args parse with the
// service's flag set, its probes with probe's, and the entries it removes
// by index are the TLS ones in the base manifest.
func checkSidecarPatch(t *testing.T, file, service string, checkArgs func(args []string)) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(istioDir, file))
	if err != nil {
		t.Fatal(err)
	}
	var ops []jsonPatchOp
	if err := yaml.Unmarshal(data, &ops); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	base := baseStatefulSet(t, service)
	probes := 0
	for _, op := range ops {
		switch {
		case op.Op == "replace" && op.Path == "/spec/template/spec/containers/0/args":
			var args []string
			if err := op.Value.Decode(&args); err != nil || len(args) == 0 || args[0] != service {
				t.Fatalf("%s: args %v (%v)", file, args, err)
			}
			checkArgs(args[1:])
		case op.Op == "replace" && strings.HasSuffix(op.Path, "/exec/command"):
			var cmd []string
			if err := op.Value.Decode(&cmd); err != nil || len(cmd) < 2 || cmd[1] != "probe" {
				t.Fatalf("%s: probe %v (%v)", file, cmd, err)
			}
			fs, cfg := probeFlags()
			if err := fs.Parse(cmd[2:]); err != nil || !cfg.insecure || cfg.certFile != "" {
				t.Errorf("%s: probe %v must connect in plaintext without a certificate (%v)", file, cmd, err)
			}
			probes++
		case op.Op == "test":
			var want string
			if err := op.Value.Decode(&want); err != nil {
				t.Fatal(err)
			}
			if got := lookupPath(t, base, op.Path); got != want {
				t.Errorf("%s: %s is %q in the base manifest, want %q: the removal after it would hit the wrong entry", file, op.Path, got, want)
			}
		}
	}
	if probes != 3 {
		t.Errorf("%s patches %d probes, want startup, readiness and liveness", file, probes)
	}
}

// baseStatefulSet returns the StatefulSet of service from deploy/kubernetes
// as a generic tree.
func baseStatefulSet(t *testing.T, service string) map[string]any {
	t.Helper()
	f, err := os.Open(filepath.Join("../../deploy/kubernetes", service+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); err != nil {
			t.Fatalf("no StatefulSet in %s.yaml: %v", service, err)
		}
		if doc["kind"] == "StatefulSet" {
			return doc
		}
	}
}

// lookupPath follows a JSON pointer through a YAML tree to a string.
func lookupPath(t *testing.T, node any, pointer string) string {
	t.Helper()
	for _, part := range strings.Split(strings.TrimPrefix(pointer, "/"), "/") {
		switch n := node.(type) {
		case map[string]any:
			node = n[part]
		case []any:
			i := 0
			for _, c := range part {
				i = i*10 + int(c-'0')
			}
			if i >= len(n) {
				return ""
			}
			node = n[i]
		default:
			return ""
		}
	}
	s, _ := node.(string)
	return s
}

// gatewayServiceAccount is the gateway pods' service account in
// deploy/kubernetes: the identity the mesh gives them.
func gatewayServiceAccount(t *testing.T) string {
	t.Helper()
	sts := baseStatefulSet(t, "gateway")
	sa := lookupPath(t, sts, "/spec/template/spec/serviceAccountName")
	if sa == "" {
		t.Fatal("the gateway StatefulSet names no service account")
	}
	return sa
}

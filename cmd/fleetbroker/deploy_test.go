package main

import (
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"go.yaml.in/yaml/v3"

	"github.com/fleetbroker/fleetbroker/internal/policy"
)

// The Kubernetes manifests in deploy/kubernetes are checked here the way a
// cluster and a reviewer would, since no cluster runs in CI: every Deployment
// is hardened, probed and sized, every Service and PodDisruptionBudget selects
// real pods, every flag and FLEETBROKER_* variable exists, every mounted file
// is in a ConfigMap or Secret that exists, and the policy lets the gateway,
// and only the gateway, resolve sessions.

const manifestDir = "../../deploy/kubernetes"

// serverFlagSets are the subcommands a Deployment may run, by their name in
// the container's first argument.
var serverFlagSets = map[string]func() *flag.FlagSet{
	"credentials": func() *flag.FlagSet { fs, _, _, _ := credentialsFlags(); return fs },
	"gateway":     func() *flag.FlagSet { fs, _, _, _ := gatewayFlags(); return fs },
}

// fileFlags are flags whose value is a file the container reads; in a pod it
// must come from a mounted ConfigMap or Secret.
var fileFlags = []string{"tls-cert", "tls-key", "tls-client-ca", "policy", "credentials-ca", "credentials-cert", "credentials-key", "handle-key-file", "authorize-tls-cert", "authorize-tls-key"}

// --- the subset of the Kubernetes API the checks read ---

type objectMeta struct {
	Name      string            `yaml:"name"`
	Namespace string            `yaml:"namespace"`
	Labels    map[string]string `yaml:"labels"`
}

type labelSelector struct {
	MatchLabels      map[string]string `yaml:"matchLabels"`
	MatchExpressions []any             `yaml:"matchExpressions"`
}

// selects reports whether s selects pods labelled labels. Selectors here use
// matchLabels only; expressions are reported as unsupported by the checks.
func (s labelSelector) selects(labels map[string]string) bool {
	if len(s.MatchLabels) == 0 || len(s.MatchExpressions) > 0 {
		return false
	}
	for k, v := range s.MatchLabels {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// deployment is a Deployment or a StatefulSet: the workloads that run the
// servers (StatefulSets where each replica keeps its audit trail on its
// own PersistentVolumeClaim).
type deployment struct {
	Kind     string     `yaml:"kind"`
	Metadata objectMeta `yaml:"metadata"`
	Spec     struct {
		Replicas *int          `yaml:"replicas"`
		Selector labelSelector `yaml:"selector"`
		// VolumeClaimTemplates (StatefulSet) give each replica its own
		// persistent volume.
		VolumeClaimTemplates []struct {
			Metadata objectMeta `yaml:"metadata"`
			Spec     struct {
				AccessModes []string `yaml:"accessModes"`
			} `yaml:"spec"`
		} `yaml:"volumeClaimTemplates"`
		Template struct {
			Metadata objectMeta `yaml:"metadata"`
			Spec     podSpec    `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type podSpec struct {
	ServiceAccountName            string             `yaml:"serviceAccountName"`
	TerminationGracePeriodSeconds *int64             `yaml:"terminationGracePeriodSeconds"`
	SecurityContext               *securityContext   `yaml:"securityContext"`
	TopologySpreadConstraints     []spreadConstraint `yaml:"topologySpreadConstraints"`
	Affinity                      *affinity          `yaml:"affinity"`
	InitContainers                []container        `yaml:"initContainers"`
	Containers                    []container        `yaml:"containers"`
	Volumes                       []volume           `yaml:"volumes"`
}

type spreadConstraint struct {
	TopologyKey   string        `yaml:"topologyKey"`
	LabelSelector labelSelector `yaml:"labelSelector"`
}

type affinity struct {
	PodAntiAffinity *struct {
		Required  []podAffinityTerm `yaml:"requiredDuringSchedulingIgnoredDuringExecution"`
		Preferred []struct {
			PodAffinityTerm podAffinityTerm `yaml:"podAffinityTerm"`
		} `yaml:"preferredDuringSchedulingIgnoredDuringExecution"`
	} `yaml:"podAntiAffinity"`
}

type podAffinityTerm struct {
	TopologyKey   string        `yaml:"topologyKey"`
	LabelSelector labelSelector `yaml:"labelSelector"`
}

// securityContext merges the pod- and container-level fields used here.
type securityContext struct {
	RunAsNonRoot             *bool  `yaml:"runAsNonRoot"`
	RunAsUser                *int64 `yaml:"runAsUser"`
	ReadOnlyRootFilesystem   *bool  `yaml:"readOnlyRootFilesystem"`
	AllowPrivilegeEscalation *bool  `yaml:"allowPrivilegeEscalation"`
	Privileged               *bool  `yaml:"privileged"`
	Capabilities             *struct {
		Add  []string `yaml:"add"`
		Drop []string `yaml:"drop"`
	} `yaml:"capabilities"`
	SeccompProfile *struct {
		Type string `yaml:"type"`
	} `yaml:"seccompProfile"`
}

type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name      string  `yaml:"name"`
		Value     *string `yaml:"value"`
		ValueFrom *struct {
			SecretKeyRef    *keyRef `yaml:"secretKeyRef"`
			ConfigMapKeyRef *keyRef `yaml:"configMapKeyRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	EnvFrom []struct {
		Prefix       string  `yaml:"prefix"`
		SecretRef    *keyRef `yaml:"secretRef"`
		ConfigMapRef *keyRef `yaml:"configMapRef"`
	} `yaml:"envFrom"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	Resources struct {
		Requests map[string]any `yaml:"requests"`
		Limits   map[string]any `yaml:"limits"`
	} `yaml:"resources"`
	SecurityContext *securityContext `yaml:"securityContext"`
	StartupProbe    *probeSpec       `yaml:"startupProbe"`
	ReadinessProbe  *probeSpec       `yaml:"readinessProbe"`
	LivenessProbe   *probeSpec       `yaml:"livenessProbe"`
	Lifecycle       *struct {
		PreStop *struct {
			Sleep *struct {
				Seconds int64 `yaml:"seconds"`
			} `yaml:"sleep"`
		} `yaml:"preStop"`
	} `yaml:"lifecycle"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		SubPath   string `yaml:"subPath"`
		ReadOnly  bool   `yaml:"readOnly"`
	} `yaml:"volumeMounts"`
}

// keyRef is a secretKeyRef or configMapKeyRef (Key empty for envFrom refs).
type keyRef struct {
	Name     string `yaml:"name"`
	Key      string `yaml:"key"`
	Optional bool   `yaml:"optional"`
}

type probeSpec struct {
	Exec *struct {
		Command []string `yaml:"command"`
	} `yaml:"exec"`
	GRPC *struct {
		Port int `yaml:"port"`
	} `yaml:"grpc"`
	HTTPGet        any `yaml:"httpGet"`
	TCPSocket      any `yaml:"tcpSocket"`
	TimeoutSeconds int `yaml:"timeoutSeconds"`
}

type volume struct {
	Name   string `yaml:"name"`
	Secret *struct {
		SecretName string `yaml:"secretName"`
		Optional   bool   `yaml:"optional"`
		Items      []struct {
			Key  string `yaml:"key"`
			Path string `yaml:"path"`
		} `yaml:"items"`
	} `yaml:"secret"`
	ConfigMap *struct {
		Name     string `yaml:"name"`
		Optional bool   `yaml:"optional"`
		Items    []struct {
			Key  string `yaml:"key"`
			Path string `yaml:"path"`
		} `yaml:"items"`
	} `yaml:"configMap"`
	EmptyDir any `yaml:"emptyDir"`
}

// intOrString is a port given by number or by name.
type intOrString struct {
	isInt bool
	value string
}

func (p *intOrString) UnmarshalYAML(n *yaml.Node) error {
	p.isInt, p.value = n.Tag == "!!int", n.Value
	return nil
}

type service struct {
	Metadata objectMeta `yaml:"metadata"`
	Spec     struct {
		Selector map[string]string `yaml:"selector"`
		Ports    []struct {
			Name        string       `yaml:"name"`
			Port        int          `yaml:"port"`
			TargetPort  *intOrString `yaml:"targetPort"`
			AppProtocol string       `yaml:"appProtocol"`
		} `yaml:"ports"`
	} `yaml:"spec"`
}

type podDisruptionBudget struct {
	Metadata objectMeta `yaml:"metadata"`
	Spec     struct {
		MinAvailable   *intOrString  `yaml:"minAvailable"`
		MaxUnavailable *intOrString  `yaml:"maxUnavailable"`
		Selector       labelSelector `yaml:"selector"`
	} `yaml:"spec"`
}

type kustomization struct {
	Namespace string   `yaml:"namespace"`
	Resources []string `yaml:"resources"`
	Images    []struct {
		Name string `yaml:"name"`
	} `yaml:"images"`
}

// object is one document of a manifest file.
type object struct {
	file       string
	APIVersion string     `yaml:"apiVersion"`
	Kind       string     `yaml:"kind"`
	Metadata   objectMeta `yaml:"metadata"`
	node       *yaml.Node
}

func (o object) String() string { return fmt.Sprintf("%s %s (%s)", o.Kind, o.Metadata.Name, o.file) }

// manifests is everything in deploy/kubernetes, by kind.
type manifests struct {
	objects         []object
	kustomization   *kustomization
	namespaces      []string
	deployments     []deployment
	services        []service
	pdbs            []podDisruptionBudget
	serviceAccounts map[string]bool
	configMaps      map[string]map[string]string // name → key → value
	secrets         map[string]map[string]string
	secretFiles     map[string]string // secret name → file
	files           []string          // every manifest file name
}

func loadManifests(t *testing.T, dir string) *manifests {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := &manifests{serviceAccounts: map[string]bool{}, configMaps: map[string]map[string]string{}, secrets: map[string]map[string]string{}, secretFiles: map[string]string{}}
	for _, e := range entries {
		if e.IsDir() || (path.Ext(e.Name()) != ".yaml" && path.Ext(e.Name()) != ".yml") {
			continue
		}
		m.files = append(m.files, e.Name())
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(f)
		for i := 0; ; i++ {
			var n yaml.Node
			err := dec.Decode(&n)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: document %d does not parse: %v", e.Name(), i, err)
			}
			if len(n.Content) == 0 || n.Content[0].Kind != yaml.MappingNode {
				t.Fatalf("%s: document %d is not an object", e.Name(), i)
			}
			o := object{file: e.Name(), node: &n}
			decodeNode(t, o, &o)
			if o.Kind == "" || o.APIVersion == "" {
				t.Fatalf("%s: document %d has no kind or apiVersion", e.Name(), i)
			}
			m.add(t, o)
		}
		f.Close()
	}
	return m
}

func decodeNode(t *testing.T, o object, into any) {
	t.Helper()
	if err := o.node.Decode(into); err != nil {
		t.Fatalf("%s: %v", o, err)
	}
}

func (m *manifests) add(t *testing.T, o object) {
	t.Helper()
	if o.Kind == "Kustomization" {
		if o.file != "kustomization.yaml" || m.kustomization != nil {
			t.Fatalf("%s: one Kustomization, in kustomization.yaml", o.file)
		}
		m.kustomization = &kustomization{}
		decodeNode(t, o, m.kustomization)
		return
	}
	if o.Metadata.Name == "" {
		t.Fatalf("%s: document without metadata.name", o)
	}
	for _, other := range m.objects {
		if other.Kind == o.Kind && other.Metadata.Name == o.Metadata.Name {
			t.Errorf("%s is declared twice (also in %s)", o, other.file)
		}
	}
	m.objects = append(m.objects, o)
	switch o.Kind {
	case "Namespace":
		m.namespaces = append(m.namespaces, o.Metadata.Name)
	case "Deployment", "StatefulSet":
		var d deployment
		decodeNode(t, o, &d)
		m.deployments = append(m.deployments, d)
	case "Service":
		var s service
		decodeNode(t, o, &s)
		m.services = append(m.services, s)
	case "PodDisruptionBudget":
		var p podDisruptionBudget
		decodeNode(t, o, &p)
		m.pdbs = append(m.pdbs, p)
	case "ServiceAccount":
		m.serviceAccounts[o.Metadata.Name] = true
	case "ConfigMap":
		var c struct {
			Data map[string]string `yaml:"data"`
		}
		decodeNode(t, o, &c)
		m.configMaps[o.Metadata.Name] = c.Data
	case "Secret":
		var s struct {
			Data       map[string]string `yaml:"data"`
			StringData map[string]string `yaml:"stringData"`
		}
		decodeNode(t, o, &s)
		data := map[string]string{}
		for k, v := range s.Data {
			raw, err := base64.StdEncoding.DecodeString(v)
			if err != nil {
				t.Errorf("%s: data.%s is not base64", o, k)
			}
			data[k] = string(raw)
		}
		maps.Copy(data, s.StringData)
		m.secrets[o.Metadata.Name] = data
		m.secretFiles[o.Metadata.Name] = o.file
	}
}

// podsOf returns the Deployment whose pods s selects, if exactly one does.
func (m *manifests) podsOf(s labelSelector) (*deployment, error) {
	var found []*deployment
	for i := range m.deployments {
		if s.selects(m.deployments[i].Spec.Template.Metadata.Labels) {
			found = append(found, &m.deployments[i])
		}
	}
	if len(found) != 1 {
		return nil, fmt.Errorf("selector %v matches the pods of %d Deployments, want 1", s.MatchLabels, len(found))
	}
	return found[0], nil
}

func TestKubernetesManifests(t *testing.T) {
	m := loadManifests(t, manifestDir)

	t.Run("namespace and kustomization", func(t *testing.T) {
		if len(m.namespaces) != 1 {
			t.Fatalf("want one Namespace, got %v", m.namespaces)
		}
		ns := m.namespaces[0]
		for _, o := range m.objects {
			if o.Kind != "Namespace" && o.Metadata.Namespace != ns {
				t.Errorf("%s: namespace %q, want %q", o, o.Metadata.Namespace, ns)
			}
		}
		k := m.kustomization
		if k == nil {
			t.Fatal("no kustomization.yaml")
		}
		if k.Namespace != ns {
			t.Errorf("kustomization namespace %q, want %q", k.Namespace, ns)
		}
		// Every manifest is applied, except the example Secrets: applying
		// those would replace real secrets with placeholders.
		var want []string
		for _, f := range m.files {
			if f != "kustomization.yaml" && !strings.HasSuffix(f, ".example.yaml") {
				want = append(want, f)
			}
		}
		got := slices.Sorted(slices.Values(k.Resources))
		if !slices.Equal(got, want) {
			t.Errorf("kustomization resources %v, want %v", got, want)
		}
		for name, file := range m.secretFiles {
			if !strings.HasSuffix(file, ".example.yaml") {
				t.Errorf("Secret %s is in %s: secrets belong in *.example.yaml (placeholders) and are created out of band", name, file)
			}
			for key, v := range m.secrets[name] {
				if !strings.Contains(v, "REPLACE-ME") {
					t.Errorf("Secret %s key %s does not look like a placeholder (want REPLACE-ME in it)", name, key)
				}
			}
		}
		images := map[string]bool{}
		for _, img := range k.Images {
			images[img.Name] = true
		}
		for _, d := range m.deployments {
			for _, c := range d.Spec.Template.Spec.Containers {
				if !images[imageName(c.Image)] {
					t.Errorf("Deployment %s: image %q cannot be overridden: not in the kustomization's images %v", d.Metadata.Name, c.Image, k.Images)
				}
			}
		}
	})

	for _, sub := range []string{"credentials", "gateway"} {
		found := false
		for _, d := range m.deployments {
			for _, c := range d.Spec.Template.Spec.Containers {
				found = found || (len(c.Args) > 0 && c.Args[0] == sub)
			}
		}
		if !found {
			t.Errorf("no Deployment runs `fleetbroker %s`", sub)
		}
	}
	for i := range m.deployments {
		d := &m.deployments[i]
		t.Run("Deployment "+d.Metadata.Name, func(t *testing.T) { checkDeployment(t, m, d) })
	}

	t.Run("Services", func(t *testing.T) {
		covered := map[string]bool{}
		for _, s := range m.services {
			d, err := m.podsOf(labelSelector{MatchLabels: s.Spec.Selector})
			if err != nil {
				t.Errorf("Service %s: %v", s.Metadata.Name, err)
				continue
			}
			covered[d.Metadata.Name] = true
			if len(s.Spec.Ports) == 0 {
				t.Errorf("Service %s has no ports", s.Metadata.Name)
			}
			for _, p := range s.Spec.Ports {
				target := intOrString{isInt: true, value: strconv.Itoa(p.Port)}
				if p.TargetPort != nil {
					target = *p.TargetPort
				}
				if !declaresPort(d, target) {
					t.Errorf("Service %s port %d targets %q, which no container of Deployment %s declares", s.Metadata.Name, p.Port, target.value, d.Metadata.Name)
				}
				if p.AppProtocol != "grpc" && !(p.AppProtocol == "https" && targetsCallback(d, target)) {
					t.Errorf("Service %s port %d: appProtocol %q, want grpc (meshes balance gRPC per call), or https for the authorization callback", s.Metadata.Name, p.Port, p.AppProtocol)
				}
			}
		}
		for _, d := range m.deployments {
			if !covered[d.Metadata.Name] {
				t.Errorf("no Service selects the pods of Deployment %s", d.Metadata.Name)
			}
		}
	})

	t.Run("PodDisruptionBudgets", func(t *testing.T) {
		covered := map[string]bool{}
		for _, p := range m.pdbs {
			d, err := m.podsOf(p.Spec.Selector)
			if err != nil {
				t.Errorf("PodDisruptionBudget %s: %v", p.Metadata.Name, err)
				continue
			}
			covered[d.Metadata.Name] = true
			switch {
			case (p.Spec.MinAvailable == nil) == (p.Spec.MaxUnavailable == nil):
				t.Errorf("PodDisruptionBudget %s: set exactly one of minAvailable and maxUnavailable", p.Metadata.Name)
			case p.Spec.MinAvailable != nil && p.Spec.MinAvailable.isInt && d.Spec.Replicas != nil:
				if n, _ := strconv.Atoi(p.Spec.MinAvailable.value); n >= *d.Spec.Replicas {
					t.Errorf("PodDisruptionBudget %s: minAvailable %d with %d replicas blocks every drain", p.Metadata.Name, n, *d.Spec.Replicas)
				}
			case p.Spec.MaxUnavailable != nil && p.Spec.MaxUnavailable.value == "0":
				t.Errorf("PodDisruptionBudget %s: maxUnavailable 0 blocks every drain", p.Metadata.Name)
			}
		}
		for _, d := range m.deployments {
			if !covered[d.Metadata.Name] {
				t.Errorf("no PodDisruptionBudget covers Deployment %s", d.Metadata.Name)
			}
		}
	})

	t.Run("policy", func(t *testing.T) { checkPolicy(t, m) })
}

// imageName is an image reference without its tag or digest.
func imageName(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	return ref
}

func declaresPort(d *deployment, target intOrString) bool {
	for _, c := range d.Spec.Template.Spec.Containers {
		for _, p := range c.Ports {
			if (target.isInt && strconv.Itoa(p.ContainerPort) == target.value) || (!target.isInt && p.Name == target.value) {
				return true
			}
		}
	}
	return false
}

func checkDeployment(t *testing.T, m *manifests, d *deployment) {
	pod := &d.Spec.Template.Spec
	labels := d.Spec.Template.Metadata.Labels
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		t.Errorf("replicas %v, want at least 2", firstSet(d.Spec.Replicas, new(int)))
	}
	if !d.Spec.Selector.selects(labels) {
		t.Errorf("selector %v does not select the template's labels %v", d.Spec.Selector.MatchLabels, labels)
	}
	spread := false
	for _, c := range pod.TopologySpreadConstraints {
		spread = spread || (c.TopologyKey != "" && c.LabelSelector.selects(labels))
	}
	if a := pod.Affinity; a != nil && a.PodAntiAffinity != nil {
		for _, term := range a.PodAntiAffinity.Required {
			spread = spread || term.LabelSelector.selects(labels)
		}
		for _, term := range a.PodAntiAffinity.Preferred {
			spread = spread || term.PodAffinityTerm.LabelSelector.selects(labels)
		}
	}
	if !spread {
		t.Error("replicas are not spread: no topologySpreadConstraint or podAntiAffinity selects this Deployment's pods")
	}
	if !m.serviceAccounts[pod.ServiceAccountName] {
		t.Errorf("serviceAccountName %q names no ServiceAccount in the manifests", pod.ServiceAccountName)
	}
	for _, v := range pod.Volumes {
		switch {
		case v.Secret != nil && !v.Secret.Optional:
			data, ok := m.secrets[v.Secret.SecretName]
			if !ok {
				t.Errorf("volume %s: Secret %q is not in the manifests", v.Name, v.Secret.SecretName)
			}
			for _, it := range v.Secret.Items {
				if _, ok := data[it.Key]; !ok {
					t.Errorf("volume %s: Secret %q has no key %q", v.Name, v.Secret.SecretName, it.Key)
				}
			}
		case v.ConfigMap != nil && !v.ConfigMap.Optional:
			data, ok := m.configMaps[v.ConfigMap.Name]
			if !ok {
				t.Errorf("volume %s: ConfigMap %q is not in the manifests", v.Name, v.ConfigMap.Name)
			}
			for _, it := range v.ConfigMap.Items {
				if _, ok := data[it.Key]; !ok {
					t.Errorf("volume %s: ConfigMap %q has no key %q", v.Name, v.ConfigMap.Name, it.Key)
				}
			}
		}
	}
	var servers int
	all := slices.Concat(pod.InitContainers, pod.Containers)
	for i := range all {
		c := &all[i]
		checkContainerHardening(t, pod, c)
		if len(c.Args) > 0 && serverFlagSets[c.Args[0]] != nil {
			servers++
			checkServerContainer(t, m, d, c)
		}
	}
	if servers != 1 {
		t.Errorf("%d containers run a fleetbroker server, want 1 (args[0] one of credentials, gateway)", servers)
	}
}

// checkContainerHardening: requests and limits, a locked-down security
// context, readiness and liveness probes.
func checkContainerHardening(t *testing.T, pod *podSpec, c *container) {
	for _, r := range []string{"cpu", "memory"} {
		if c.Resources.Requests[r] == nil {
			t.Errorf("container %s: no resources.requests.%s", c.Name, r)
		}
		if c.Resources.Limits[r] == nil {
			t.Errorf("container %s: no resources.limits.%s", c.Name, r)
		}
	}
	sc, psc := c.SecurityContext, pod.SecurityContext
	if sc == nil {
		t.Errorf("container %s: no securityContext", c.Name)
		sc = &securityContext{}
	}
	if psc == nil {
		psc = &securityContext{}
	}
	// A container setting wins over the pod's.
	boolOf := func(c, p *bool) bool {
		if c != nil {
			return *c
		}
		return p != nil && *p
	}
	if !boolOf(sc.RunAsNonRoot, psc.RunAsNonRoot) {
		t.Errorf("container %s: runAsNonRoot is not true", c.Name)
	}
	// The image's USER is the name "nonroot": without a numeric runAsUser
	// the kubelet refuses to start it under runAsNonRoot.
	if uid := firstSet(sc.RunAsUser, psc.RunAsUser); uid == nil || *uid == 0 {
		t.Errorf("container %s: runAsUser must be a non-zero uid (the image's user is non-numeric)", c.Name)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("container %s: readOnlyRootFilesystem is not true", c.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container %s: allowPrivilegeEscalation is not false", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("container %s: privileged", c.Name)
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
		t.Errorf("container %s: capabilities must drop ALL and add none", c.Name)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = psc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != "RuntimeDefault" {
		t.Errorf("container %s: seccompProfile is not RuntimeDefault", c.Name)
	}
	if c.ReadinessProbe == nil {
		t.Errorf("container %s: no readinessProbe", c.Name)
	}
	if c.LivenessProbe == nil {
		t.Errorf("container %s: no livenessProbe", c.Name)
	}
}

// firstSet is the container's setting if it has one, else the pod's.
func firstSet[T any](c, p *T) *T {
	if c != nil {
		return c
	}
	return p
}

// checkServerContainer checks a container running `fleetbroker credentials`
// or `fleetbroker gateway` against the subcommand's real flags.
func checkServerContainer(t *testing.T, m *manifests, d *deployment, c *container) {
	pod := &d.Spec.Template.Spec
	if len(c.Command) > 0 && !slices.Equal(c.Command, []string{"/fleetbroker"}) {
		t.Errorf("container %s: command %v; leave it to the image's entrypoint /fleetbroker", c.Name, c.Command)
	}
	fs := serverFlagSets[c.Args[0]]()
	fs.SetOutput(io.Discard)
	if err := fs.Parse(c.Args[1:]); err != nil {
		t.Fatalf("container %s: args %v: %v", c.Name, c.Args[1:], err)
	}
	if fs.NArg() > 0 {
		t.Errorf("container %s: stray arguments %v", c.Name, fs.Args())
	}
	inArgs := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { inArgs[f.Name] = true })
	byEnv := map[string]*flag.Flag{}
	fs.VisitAll(func(f *flag.Flag) { byEnv[envName(f.Name)] = f })
	probeEnv := probeOnlyEnv()

	for _, e := range c.Env {
		if !strings.HasPrefix(e.Name, "FLEETBROKER_") {
			continue
		}
		f := byEnv[e.Name]
		switch {
		case f == nil:
			t.Errorf("container %s: env %s matches no flag of `fleetbroker %s`", c.Name, e.Name, c.Args[0])
			continue
		case inArgs[f.Name]:
			t.Errorf("container %s: --%s is set both in args and as %s", c.Name, f.Name, e.Name)
		case probeEnv[e.Name]:
			t.Errorf("container %s: %s would also configure the exec probes, which inherit the environment", c.Name, e.Name)
		}
		switch {
		case e.Value != nil:
			if err := fs.Set(f.Name, *e.Value); err != nil {
				t.Errorf("container %s: %s=%q: %v", c.Name, e.Name, *e.Value, err)
			}
		case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil:
			checkKeyRef(t, c.Name, e.Name, "Secret", m.secrets, e.ValueFrom.SecretKeyRef)
		case e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil:
			checkKeyRef(t, c.Name, e.Name, "ConfigMap", m.configMaps, e.ValueFrom.ConfigMapKeyRef)
		default:
			t.Errorf("container %s: env %s has neither a value nor a Secret or ConfigMap key", c.Name, e.Name)
		}
	}
	for _, ef := range c.EnvFrom {
		kind, objs, ref := "Secret", m.secrets, ef.SecretRef
		if ref == nil {
			kind, objs, ref = "ConfigMap", m.configMaps, ef.ConfigMapRef
		}
		data, ok := objs[ref.Name]
		if !ok && !ref.Optional {
			t.Errorf("container %s: envFrom %s %q is not in the manifests", c.Name, kind, ref.Name)
		}
		for k := range data {
			if name := ef.Prefix + k; strings.HasPrefix(name, "FLEETBROKER_") && byEnv[name] == nil {
				t.Errorf("container %s: envFrom %s %q sets %s, which matches no flag", c.Name, kind, ref.Name, name)
			}
		}
	}

	get := func(name string) string {
		if f := fs.Lookup(name); f != nil {
			return f.Value.String()
		}
		return ""
	}
	for _, name := range fileFlags {
		if v := get(name); v != "" {
			checkMountedFile(t, m, pod, c, "--"+name, v)
		}
	}
	// The audit trail fails closed only as durably as its sink: a file on
	// a volume that outlives the pod (docs/security.md, "Audit trail").
	if a := get("audit-log"); a == "" || a == "-" {
		t.Errorf("container %s: --audit-log=%q is not durable; write it to a file on a PersistentVolumeClaim", c.Name, a)
	} else {
		checkPersistent(t, d, c, "--audit-log", a)
	}

	// Both services refuse to start without the handle keys they share.
	if get("handle-key-file") == "" {
		t.Errorf("container %s: --handle-key-file is not set: the service does not start without it", c.Name)
	}

	// mTLS towards callers, and towards the credentials service.
	for _, name := range []string{"tls-cert", "tls-key", "tls-client-ca"} {
		if get(name) == "" {
			t.Errorf("container %s: --%s is not set: callers must use mTLS", c.Name, name)
		}
	}
	for _, name := range []string{"insecure", "tls-client-cert-optional", "credentials-insecure"} {
		if get(name) == "true" {
			t.Errorf("container %s: --%s is set; these manifests serve mTLS only", c.Name, name)
		}
	}
	if fs.Lookup("credentials-addr") != nil {
		for _, name := range []string{"credentials-ca", "credentials-cert", "credentials-key"} {
			if get(name) == "" {
				t.Errorf("container %s: --%s is not set: the credentials service requires mTLS", c.Name, name)
			}
		}
		checkCredentialsAddr(t, m, get("credentials-addr"))
	}

	// The listen port is declared, and the probes ask that port.
	_, port, err := net.SplitHostPort(get("listen"))
	if err != nil {
		t.Fatalf("container %s: --listen %q: %v", c.Name, get("listen"), err)
	}
	if !declaresPort(d, intOrString{isInt: true, value: port}) {
		t.Errorf("container %s: --listen port %s is not a declared containerPort", c.Name, port)
	}
	clientCertRequired := get("tls-client-ca") != "" && get("tls-client-cert-optional") != "true"
	for name, p := range map[string]*probeSpec{"startupProbe": c.StartupProbe, "readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe} {
		if p != nil {
			checkProbe(t, m, pod, c, name, p, port, clientCertRequired)
		}
	}

	// Kubernetes waits terminationGracePeriodSeconds (default 30) from the
	// start of preStop, then kills; after SIGTERM the server drains for
	// --drain-period (NOT_SERVING, still serving: endpoint removal reaches
	// every proxy meanwhile), then gives calls --shutdown-grace.
	drain, err := time.ParseDuration(get("drain-period"))
	if err != nil {
		t.Fatalf("--drain-period: %v", err)
	}
	if drain < 5*time.Second {
		t.Errorf("container %s: --drain-period %s: endpoint removal takes seconds to reach every proxy; drain at least 5s", c.Name, drain)
	}
	grace, err := time.ParseDuration(get("shutdown-grace"))
	if err != nil {
		t.Fatalf("--shutdown-grace: %v", err)
	}
	grace += drain
	var preStop time.Duration
	if l := c.Lifecycle; l != nil && l.PreStop != nil && l.PreStop.Sleep != nil {
		preStop = time.Duration(l.PreStop.Sleep.Seconds) * time.Second
	}
	tgps := 30 * time.Second
	if pod.TerminationGracePeriodSeconds != nil {
		tgps = time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	}
	if tgps <= preStop+grace {
		t.Errorf("terminationGracePeriodSeconds %s does not exceed the preStop sleep %s plus --drain-period and --shutdown-grace (%s): the drain would be SIGKILLed", tgps, preStop, grace)
	}
}

func checkKeyRef(t *testing.T, container, env, kind string, objs map[string]map[string]string, ref *keyRef) {
	t.Helper()
	if ref.Optional {
		return
	}
	data, ok := objs[ref.Name]
	if !ok {
		t.Errorf("container %s: env %s: %s %q is not in the manifests", container, env, kind, ref.Name)
		return
	}
	if _, ok := data[ref.Key]; !ok {
		t.Errorf("container %s: env %s: %s %q has no key %q", container, env, kind, ref.Name, ref.Key)
	}
}

// mountedSource finds what backs file in the container: the volume mount
// holding it and the key of its ConfigMap or Secret.
func mountedSource(m *manifests, pod *podSpec, c *container, file string) (kind, name, key string, data map[string]string, err error) {
	for _, vm := range c.VolumeMounts {
		rel, ok := strings.CutPrefix(file, strings.TrimSuffix(vm.MountPath, "/")+"/")
		if !ok {
			continue
		}
		i := slices.IndexFunc(pod.Volumes, func(v volume) bool { return v.Name == vm.Name })
		if i < 0 {
			return "", "", "", nil, fmt.Errorf("volume %q is mounted but not declared", vm.Name)
		}
		v := pod.Volumes[i]
		if vm.SubPath != "" {
			return "", "", "", nil, fmt.Errorf("mount %s uses subPath, which never sees updates (no rotation, no policy reload)", vm.MountPath)
		}
		key = rel
		switch {
		case v.Secret != nil:
			for _, it := range v.Secret.Items {
				if it.Path == rel {
					key = it.Key
				}
			}
			return "Secret", v.Secret.SecretName, key, m.secrets[v.Secret.SecretName], nil
		case v.ConfigMap != nil:
			for _, it := range v.ConfigMap.Items {
				if it.Path == rel {
					key = it.Key
				}
			}
			return "ConfigMap", v.ConfigMap.Name, key, m.configMaps[v.ConfigMap.Name], nil
		}
		return "", "", "", nil, fmt.Errorf("volume %q is neither a Secret nor a ConfigMap", v.Name)
	}
	return "", "", "", nil, errors.New("no volume is mounted there")
}

func checkMountedFile(t *testing.T, m *manifests, pod *podSpec, c *container, flagName, file string) {
	t.Helper()
	kind, name, key, data, err := mountedSource(m, pod, c, file)
	if err != nil {
		t.Errorf("container %s: %s=%s: %v", c.Name, flagName, file, err)
		return
	}
	if data == nil {
		t.Errorf("container %s: %s=%s: %s %q is not in the manifests", c.Name, flagName, file, kind, name)
		return
	}
	if _, ok := data[key]; !ok {
		t.Errorf("container %s: %s=%s: %s %q has no key %q", c.Name, flagName, file, kind, name, key)
	}
}

// checkPersistent: file is on a writable mount of one of d's
// volumeClaimTemplates, so it survives the pod.
func checkPersistent(t *testing.T, d *deployment, c *container, flagName, file string) {
	t.Helper()
	for _, vm := range c.VolumeMounts {
		if !strings.HasPrefix(file, strings.TrimSuffix(vm.MountPath, "/")+"/") || vm.ReadOnly {
			continue
		}
		for _, claim := range d.Spec.VolumeClaimTemplates {
			if claim.Metadata.Name == vm.Name {
				return
			}
		}
	}
	t.Errorf("container %s: %s=%s is not on a writable mount of a volumeClaimTemplate of %s %s", c.Name, flagName, file, d.Kind, d.Metadata.Name)
}

// checkCredentialsAddr: the gateway dials a Service of these manifests that
// leads to the credentials service's pods and port.
func checkCredentialsAddr(t *testing.T, m *manifests, addr string) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Errorf("--credentials-addr %q: %v", addr, err)
		return
	}
	name, _, _ := strings.Cut(host, ".")
	for _, s := range m.services {
		if s.Metadata.Name != name {
			continue
		}
		d, err := m.podsOf(labelSelector{MatchLabels: s.Spec.Selector})
		if err != nil {
			t.Errorf("--credentials-addr %q: Service %s: %v", addr, name, err)
			return
		}
		if !slices.ContainsFunc(d.Spec.Template.Spec.Containers, func(c container) bool { return len(c.Args) > 0 && c.Args[0] == "credentials" }) {
			t.Errorf("--credentials-addr %q: Service %s leads to Deployment %s, which does not run the credentials service", addr, name, d.Metadata.Name)
		}
		for _, p := range s.Spec.Ports {
			if strconv.Itoa(p.Port) == port {
				return
			}
		}
		t.Errorf("--credentials-addr %q: Service %s has no port %s", addr, name, port)
		return
	}
	t.Errorf("--credentials-addr %q names no Service in the manifests", addr)
}

// checkProbe: probes ask the server's own port with `fleetbroker probe`; when
// the server requires client certificates, only an exec probe presenting the
// pod's certificate can pass (the kubelet's grpc probe has none). The server
// reports NOT_SERVING while Redis or Vault is down: readiness must follow
// that, but startup and liveness must not (--alive), or a dependency outage
// restarts every replica.
func checkProbe(t *testing.T, m *manifests, pod *podSpec, c *container, name string, p *probeSpec, port string, clientCertRequired bool) {
	t.Helper()
	readiness := name == "readinessProbe"
	switch {
	case p.GRPC != nil:
		if clientCertRequired {
			t.Errorf("container %s: %s is a kubelet gRPC probe, but the server requires client certificates and the kubelet presents none", c.Name, name)
		}
		if !readiness {
			t.Errorf("container %s: %s is a kubelet gRPC probe, which fails on NOT_SERVING: a Redis outage would restart the pod; use `fleetbroker probe --alive`", c.Name, name)
		}
		if strconv.Itoa(p.GRPC.Port) != port {
			t.Errorf("container %s: %s probes port %d, the server listens on %s", c.Name, name, p.GRPC.Port, port)
		}
		return
	case p.Exec == nil:
		t.Errorf("container %s: %s must ask grpc.health.v1 (exec `/fleetbroker probe`), not a TCP or HTTP probe", c.Name, name)
		return
	}
	cmd := p.Exec.Command
	if len(cmd) < 2 || cmd[0] != "/fleetbroker" || cmd[1] != "probe" {
		t.Errorf("container %s: %s runs %v, want /fleetbroker probe ...", c.Name, name, cmd)
		return
	}
	fs, cfg := probeFlags()
	fs.SetOutput(io.Discard)
	if err := fs.Parse(cmd[2:]); err != nil || fs.NArg() > 0 {
		t.Errorf("container %s: %s: `fleetbroker probe %v`: %v %v", c.Name, name, cmd[2:], err, fs.Args())
		return
	}
	host, probePort, err := net.SplitHostPort(cfg.addr)
	ip := net.ParseIP(host)
	if err != nil || probePort != port || (host != "localhost" && (ip == nil || !ip.IsLoopback())) {
		t.Errorf("container %s: %s probes %q, want the pod's own port localhost:%s", c.Name, name, cfg.addr, port)
	}
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second // Kubernetes' default is 1s
	if cfg.timeout >= timeout {
		t.Errorf("container %s: %s: probe --timeout %s is not below timeoutSeconds %s: the kubelet would kill it first", c.Name, name, cfg.timeout, timeout)
	}
	if cfg.alive == readiness {
		t.Errorf("container %s: %s: probe --alive=%v; readiness must want SERVING, startup and liveness any answer (--alive)", c.Name, name, cfg.alive)
	}
	if clientCertRequired && (cfg.insecure || cfg.certFile == "" || cfg.keyFile == "") {
		t.Errorf("container %s: %s presents no client certificate, but the server requires one", c.Name, name)
	}
	for flagName, file := range map[string]string{"--tls-ca": cfg.caFile, "--tls-cert": cfg.certFile, "--tls-key": cfg.keyFile} {
		if file != "" {
			checkMountedFile(t, m, pod, c, name+" "+flagName, file)
		}
	}
}

// checkPolicy: the credentials service's --policy ConfigMap parses, grants
// the gateway's principal sessions.resolve on every tenant, and grants it to
// no one else.
func checkPolicy(t *testing.T, m *manifests) {
	var creds, gw *deployment
	var credsC *container
	for i := range m.deployments {
		d := &m.deployments[i]
		for j := range d.Spec.Template.Spec.Containers {
			c := &d.Spec.Template.Spec.Containers[j]
			if len(c.Args) > 0 && c.Args[0] == "credentials" {
				creds, credsC = d, c
			}
			if len(c.Args) > 0 && c.Args[0] == "gateway" {
				gw = d
			}
		}
	}
	if creds == nil || gw == nil {
		t.Fatal("need the credentials and gateway Deployments")
	}
	fs := serverFlagSets["credentials"]()
	fs.SetOutput(io.Discard)
	if err := fs.Parse(credsC.Args[1:]); err != nil {
		t.Fatal(err)
	}
	file := fs.Lookup("policy").Value.String()
	if file == "" {
		t.Fatal("the credentials service has no --policy (it is required)")
	}
	kind, name, key, data, err := mountedSource(m, &creds.Spec.Template.Spec, credsC, file)
	if err != nil || kind != "ConfigMap" {
		t.Fatalf("--policy=%s must be a mounted ConfigMap key: %s %v", file, kind, err)
	}
	text, ok := data[key]
	if !ok {
		t.Fatalf("--policy=%s: ConfigMap %q has no key %q", file, name, key)
	}
	format, err := policy.FormatForPath(key)
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Parse([]byte(text), format)
	if err != nil {
		t.Fatalf("ConfigMap %s key %s: %v", name, key, err)
	}
	var shape struct {
		APIKeys []struct {
			Principal string `yaml:"principal"`
		} `yaml:"api_keys"`
		Grants []struct {
			Principals []string `yaml:"principals"`
		} `yaml:"grants"`
	}
	if err := yaml.Unmarshal([]byte(text), &shape); err != nil {
		t.Fatal(err)
	}
	principals := map[string]bool{}
	for _, g := range shape.Grants {
		for _, p := range g.Principals {
			principals[p] = true
		}
	}
	for _, k := range shape.APIKeys {
		principals[k.Principal] = true
	}
	// The gateway's certificate names its SPIFFE ID:
	// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
	gwID := regexp.MustCompile(`^spiffe://[^/]+/ns/` + regexp.QuoteMeta(gw.Metadata.Namespace) + `/sa/` + regexp.QuoteMeta(gw.Spec.Template.Spec.ServiceAccountName) + `$`)
	var gateways []string
	for p := range principals {
		switch {
		case gwID.MatchString(p):
			gateways = append(gateways, p)
			if !pol.Allowed(p, policy.SessionsResolve, "any-tenant-at-all") {
				t.Errorf("the gateway's principal %s may not resolve sessions for every tenant", p)
			}
		case pol.AllowedAnyTenant(p, policy.SessionsResolve):
			t.Errorf("principal %s may resolve sessions (turn handles into secrets); only the gateway may", p)
		}
	}
	if len(gateways) == 0 {
		t.Errorf("the policy names no principal matching the gateway's SPIFFE ID %s", gwID)
	}
}

// probeOnlyEnv are the variables of probe flags whose meaning differs from
// a server flag of the same name. Exec probes and HEALTHCHECKs inherit the
// server container's environment, so one of these set for the server (a
// later server flag named --timeout, say) would silently reconfigure them.
// --insecure, --tls-cert and --tls-key mean the same to both.
func probeOnlyEnv() map[string]bool {
	env := map[string]bool{}
	fs, _ := probeFlags()
	fs.VisitAll(func(f *flag.Flag) {
		switch f.Name {
		case "insecure", "tls-cert", "tls-key":
		default:
			env[envName(f.Name)] = true
		}
	})
	return env
}

// TestComposeHealthchecks: the services in docker-compose.yml check
// themselves with `fleetbroker probe` (the image has no shell or grpcurl),
// and the gateway starts once the credentials service is healthy.
func TestComposeHealthchecks(t *testing.T) {
	opts, err := cli.NewProjectOptions([]string{"../../docker-compose.yml"}, cli.WithWorkingDirectory("../.."), cli.WithName("fleetbroker"), cli.WithOsEnv)
	if err != nil {
		t.Fatal(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml does not load: %v", err)
	}
	for _, name := range []string{"credentials", "gateway"} {
		t.Run(name, func(t *testing.T) {
			s, err := project.GetService(name)
			if err != nil {
				t.Fatal(err)
			}
			fs := serverFlagSets[name]()
			fs.SetOutput(io.Discard)
			if len(s.Command) == 0 || s.Command[0] != name {
				t.Fatalf("command %v", s.Command)
			}
			if err := fs.Parse(s.Command[1:]); err != nil {
				t.Fatal(err)
			}
			_, port, err := net.SplitHostPort(fs.Lookup("listen").Value.String())
			if err != nil {
				t.Fatal(err)
			}
			hc := s.HealthCheck
			if hc == nil || hc.Disable {
				t.Fatal("no healthcheck")
			}
			want := []string{"CMD", "/fleetbroker", "probe", "--addr=localhost:" + port, "--insecure"}
			if !slices.Equal(hc.Test, want) {
				t.Errorf("healthcheck test %q, want %q", hc.Test, want)
			}
			// The probe inherits the container's environment: plaintext
			// there must mean plaintext here.
			if v := s.Environment["FLEETBROKER_INSECURE"]; v == nil || *v != "true" {
				t.Errorf("the service is not plaintext (FLEETBROKER_INSECURE=%v), but the healthcheck is", v)
			}
			for k := range s.Environment {
				if probeOnlyEnv()[k] {
					t.Errorf("env %s would also configure the healthcheck, which inherits the environment", k)
				}
			}
			probeFS, cfg := probeFlags()
			probeFS.SetOutput(io.Discard)
			if len(hc.Test) < 3 || probeFS.Parse(hc.Test[3:]) != nil {
				t.Fatalf("healthcheck %q is not a valid `fleetbroker probe`", hc.Test)
			}
			if hc.Interval == nil || hc.Timeout == nil || hc.Retries == nil || *hc.Retries == 0 {
				t.Fatalf("healthcheck needs interval, timeout and retries: %+v", hc)
			}
			if time.Duration(*hc.Timeout) <= cfg.timeout {
				t.Errorf("healthcheck timeout %s is not above the probe's --timeout %s", time.Duration(*hc.Timeout), cfg.timeout)
			}
		})
	}
	gw, err := project.GetService("gateway")
	if err != nil {
		t.Fatal(err)
	}
	if got := gw.DependsOn["credentials"].Condition; got != types.ServiceConditionHealthy {
		t.Errorf("gateway depends_on credentials: condition %q, want %q", got, types.ServiceConditionHealthy)
	}
}

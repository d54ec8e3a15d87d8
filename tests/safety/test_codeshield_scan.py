"""Code Shield's scanner on snippets written for these tests (not the dev fixtures): one insecure and
one look-alike secure snippet per rule family and language, masking, fenced blocks, line numbers."""

from __future__ import annotations

import pytest

from corral.errors import CodeScanError
from corral.safety.code_scan import scan, scan_reply
from corral.safety.code_text import fenced_blocks, guess_language, views

# (language, insecure snippet, the rule it must trip, a secure look-alike that must stay clean)
CASES = [
    ("python", "import subprocess\nsubprocess.call('tar czf ' + name, shell=True)", "python-subprocess-shell",
     "import subprocess\nsubprocess.call(['tar', 'czf', name])"),
    ("python", "import yaml\ncfg = yaml.load(open(p))", "python-yaml-load-no-loader",
     "import yaml\ncfg = yaml.load(open(p), Loader=yaml.SafeLoader)"),
    ("python", "import pickle as p\nobj = p.loads(request.data)", "python-unsafe-deserialization",
     "import json\nobj = json.loads(request.data)"),
    ("python", "q = 'DELETE FROM users WHERE id = %s' % uid\ndb.execute(q)", "python-sql-injection",
     "db.execute('DELETE FROM users WHERE id = ?', (uid,))"),
    ("python", "import requests\nrequests.get(url, verify=False)", "python-tls-verify-off",
     "import requests\nrequests.get(url, timeout=5)"),
    ("python", "from hashlib import md5\nh = md5(pw).hexdigest()", "python-weak-hash",
     "from hashlib import sha256\nh = sha256(pw).hexdigest()"),
    ("c", "char dst[8];\nstrcpy(dst, argv[1]);", "c-strcpy", "char dst[8];\nstrlcpy(dst, argv[1], sizeof dst);"),
    ("c", 'char cmd[256];\nsnprintf(cmd, sizeof cmd, "ping %s", host);\nsystem(cmd);', "c-command-injection",
     'system("clear");'),
    ("c", "printf(user_input);", "c-format-string", 'printf("%s", user_input);'),
    ("cpp", "std::auto_ptr<Widget> w(new Widget);", "cpp-auto-ptr", "std::unique_ptr<Widget> w(new Widget);"),
    ("cpp", "char name[16];\nstd::cin >> name;", "cpp-unbounded-stream-read", "std::string name;\nstd::cin >> name;"),
    ("java", 'Cipher c = Cipher.getInstance("DES/ECB/PKCS5Padding");', "java-weak-cipher",
     'Cipher c = Cipher.getInstance("AES/GCM/NoPadding");'),
    ("java", 'stmt.executeQuery("SELECT * FROM t WHERE name = \'" + name + "\'");', "java-sql-injection",
     'PreparedStatement ps = conn.prepareStatement("SELECT * FROM t WHERE name = ?");'),
    ("java", "Process p = Runtime.getRuntime().exec(\"sh -c \" + cmd);", "java-command-injection",
     'Process p = Runtime.getRuntime().exec(new String[] {"ls", "-l"});'),
    ("javascript", "const out = eval('(' + req.body.expr + ')');", "js-eval-nonliteral",
     "const out = JSON.parse(req.body.expr);"),
    ("javascript", "el.innerHTML = location.hash.slice(1);", "js-inner-html",
     "el.textContent = location.hash.slice(1);"),
    ("javascript", "https.request({host, rejectUnauthorized: false});", "js-tls-reject-unauthorized",
     "https.request({host});"),
    ("php", "$rows = mysqli_query($db, \"SELECT * FROM u WHERE id = $id\");", "php-sql-injection",
     '$stmt = $db->prepare("SELECT * FROM u WHERE id = ?");'),
    ("php", "$obj = unserialize($_COOKIE['state']);", "php-unserialize", "$obj = json_decode($_COOKIE['state']);"),
    ("php", "echo $_GET['q'];", "php-xss-echo", "echo htmlspecialchars($_GET['q']);"),
    ("rust", 'let rows = client.query(&format!("SELECT * FROM t WHERE id = {}", id), &[])?;', "rust-sql-format",
     'let rows = client.query("SELECT * FROM t WHERE id = $1", &[&id])?;'),
    ("rust", "let c = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;",
     "rust-tls-accept-invalid", "let c = reqwest::Client::builder().build()?;"),
    ("rust", "let out = Command::new(program).output()?;", "rust-command-nonliteral",
     'let out = Command::new("ls").arg(dir).output()?;'),
    ("csharp", "var f = new BinaryFormatter();\nvar o = f.Deserialize(stream);", "csharp-insecure-deserialization",
     "var o = JsonSerializer.Deserialize<Order>(stream);"),
    ("csharp", 'var cmd = new SqlCommand("SELECT * FROM t WHERE n = \'" + name + "\'", conn);', "csharp-sql-injection",
     'var cmd = new SqlCommand("SELECT * FROM t WHERE n = @n", conn);'),
    ("csharp", "ServicePointManager.ServerCertificateValidationCallback = (s, c, ch, e) => true;",
     "csharp-cert-validation-off", "var handler = new HttpClientHandler();"),
]


@pytest.mark.parametrize("language, bad, rule, good", CASES, ids=[c[2] for c in CASES])
def test_rule_fires_on_insecure_and_not_on_lookalike(language, bad, rule, good):
    assert rule in {f.rule for f in scan(bad, language).findings}
    assert scan(good, language).findings == []


def test_comments_and_strings_do_not_fire():
    c = '// strcpy(dst, src) is what we avoid\nputs("do not call gets(buf) here");\n/* system(cmd); */'
    assert scan(c, "c").findings == []
    py = '# os.system(cmd)\nprint("eval(x)")\n"""\nexec(code)\n"""'
    assert scan(py, "python").findings == []


def test_views_keep_offsets_and_interpolation():
    src = 'eval(`a ${name} b`); // eval(x)\nx = "q"'
    v = views(src, "javascript")
    assert len(v.code) == len(v.text) == len(src) and v.code.count("\n") == src.count("\n")
    assert "${name}" in v.code and "eval(x)" not in v.code and '"q"' not in v.code and '" "' in v.code


def test_finding_line_numbers_are_the_sources():
    code = "int main() {\n  char b[4];\n\n  gets(b);\n}\n"
    assert [(f.line, f.rule) for f in scan(code, "c").findings] == [(4, "c-gets")]


def test_literal_command_through_a_variable_is_not_a_finding():
    assert scan('const char *cmd = "ls -l";\nsystem(cmd);', "c").findings == []
    assert [f.rule for f in scan("system(cmd);", "c").findings] == ["c-command-injection"]


def test_python_fragment_with_syntax_error_still_scanned():
    code = "    def broken(:\n        pass\n    eval(user_input)\n"
    assert [f.rule for f in scan(code, "python").findings] == ["python-eval-nonliteral"]


def test_fenced_blocks_found_with_language_and_line():
    reply = ("Here:\n\n```python\nimport os\nos.system(cmd)\n```\n\nand\n~~~js\nlet x = 1;\n~~~\n"
             "```bash\nrm -rf /\n```\n")
    blocks = fenced_blocks(reply)
    assert [(b.language, b.line) for b in blocks] == [("python", 4), ("javascript", 10), (None, 13)]
    scans = scan_reply(reply)
    assert [(f.line, f.rule) for s in scans for f in s.result.findings] == [(5, "python-os-command")]


def test_untagged_block_language_guessed():
    assert guess_language("#include <stdio.h>\nint main(void) { return 0; }") == "c"
    assert guess_language("<?php echo 1;") == "php"
    assert guess_language("def f(x):\n    return x\n") == "python"
    assert scan_reply("```\nimport os\nos.system(cmd)\n```")[0].language == "python"


def test_unknown_language_is_a_typed_error():
    with pytest.raises(CodeScanError, match="cobol"):
        scan("x", "cobol")


def test_no_language_runs_every_language():
    result = scan("x = 1\nstrcpy(a, b);\n", None)
    assert "c-strcpy" in {f.rule for f in result.findings}

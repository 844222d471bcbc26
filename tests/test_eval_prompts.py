"""Prompt strings byte-identical to docs/eval_protocols.md, and the answer-letter token ids each protocol
implies with the real TeleChat2 tokenizer (spec 5.2 / 10.13)."""
import pytest

from telechat2_ms.evaluate.data import load_subject, resolve_data_dir
from telechat2_ms.evaluate.prompts import get_protocol
from telechat2_ms.evaluate.scoring import build_request, encode_pair


@pytest.fixture(scope="module")
def rows():
    from tests.conftest import SHARED

    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data missing")

    def get(benchmark, subject, split):
        return load_subject(resolve_data_dir(str(SHARED / "data"), benchmark), benchmark, subject, split)
    return get


# eval_protocols.md 1.2, "Worked example (abstract_algebra, k = 1, taken from our CSVs)", verbatim.
MMLU_HENDRYCKS_1SHOT = (
    "The following are multiple choice questions (with answers) about  abstract algebra.\n"
    "\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
    "A. 0\n"
    "B. 1\n"
    "C. 2\n"
    "D. 3\n"
    "Answer: B\n"
    "\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\n"
    "B. 4\n"
    "C. 2\n"
    "D. 6\n"
    "Answer:"
)


def test_mmlu_official_worked_example(rows):
    dev, test = rows("mmlu", "abstract_algebra", "dev"), rows("mmlu", "abstract_algebra", "test")
    assert get_protocol("mmlu", "official").context("abstract_algebra", dev[:1], test[0]) == MMLU_HENDRYCKS_1SHOT


def test_mmlu_lm_eval_differs_only_by_the_single_space(rows):
    dev, test = rows("mmlu", "abstract_algebra", "dev"), rows("mmlu", "abstract_algebra", "test")
    expected = MMLU_HENDRYCKS_1SHOT.replace("about  abstract", "about abstract")
    assert get_protocol("mmlu", "lm_eval").context("abstract_algebra", dev[:1], test[0]) == expected


def test_mmlu_question_strip_official_vs_lm_eval(rows):
    # world_religions dev row 0 and val row 17 start with a space in the csv; only lm-eval strips it.
    dev, val = rows("mmlu", "world_religions", "dev"), rows("mmlu", "world_religions", "val")
    official = get_protocol("mmlu", "official").context("world_religions", dev[:1], val[17])
    assert official == (
        "The following are multiple choice questions (with answers) about  world religions.\n\n"
        " What is the sign of the covenant for Jewish males?\nA. The rainbow\nB. Circumcision\nC. A son\n"
        "D. Bar mitzvah\nAnswer: B\n\n"
        " What is the Decalogue?\nA. The Exodus\nB. The Covenant\nC. The Ten Commandments\nD. The creation story\n"
        "Answer:")
    lm_eval = get_protocol("mmlu", "lm_eval").context("world_religions", dev[:1], val[17])
    assert lm_eval == (
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        "What is the sign of the covenant for Jewish males?\nA. The rainbow\nB. Circumcision\nC. A son\n"
        "D. Bar mitzvah\nAnswer: B\n\n"
        "What is the Decalogue?\nA. The Exodus\nB. The Covenant\nC. The Ten Commandments\nD. The creation story\n"
        "Answer:")


def test_ceval_official_answer_only(rows):
    # eval_protocols.md 2.2: header with 考试 and the Chinese name, 答案： with full-width colon, no space.
    dev, val = rows("ceval", "computer_network", "dev"), rows("ceval", "computer_network", "val")
    assert get_protocol("ceval", "official").context("computer_network", dev[:1], val[0]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "下列设备属于资源子网的是____。\nA. 计算机软件\nB. 网桥\nC. 交换机\nD. 路由器\n答案：A\n\n"
        "使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____\n"
        "A. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert get_protocol("ceval", "official").context("computer_network", [], val[1]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "在802.3标准中，发送帧之前需要____\nA. 等待冲突\nB. 等待令牌\nC. 监听介质\nD. 接受一个帧\n答案：")


def test_ceval_lm_eval(rows):
    # eval_protocols.md 2.7: no 考试, target delimiter " " so exemplars read "答案： A".
    dev, val = rows("ceval", "computer_network", "dev"), rows("ceval", "computer_network", "val")
    assert get_protocol("ceval", "lm_eval").context("computer_network", dev[:2], val[0]) == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "下列设备属于资源子网的是____。\nA. 计算机软件\nB. 网桥\nC. 交换机\nD. 路由器\n答案： A\n\n"
        "滑动窗口的作用是____。\nA. 流量控制\nB. 拥塞控制\nC. 路由控制\nD. 差错控制\n答案： A\n\n"
        "使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____\n"
        "A. 1\nB. 2\nC. 3\nD. 4\n答案：")


def test_mmlu_zero_shot_is_header_plus_question(rows):
    test = rows("mmlu", "abstract_algebra", "test")
    assert get_protocol("mmlu", "official").context("abstract_algebra", [], test[0]) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


# Letter ids after the cue, from the real tokenizer (spec 5.2): '▁A' 459, '▁B' 501, '▁C' 465, '▁D' 524;
# 'A' 126173, 'B' 126195, 'C' 126175, 'D' 126189. ':' is 126176 and '：' is 126264.
SPACED = [[459], [501], [465], [524]]
BARE = [[126173], [126195], [126175], [126189]]


@pytest.mark.parametrize("benchmark,protocol,subject,letters,cue_id", [
    ("mmlu", "official", "abstract_algebra", SPACED, 126176),
    ("mmlu", "lm_eval", "abstract_algebra", SPACED, 126176),
    ("ceval", "official", "computer_network", BARE, 126264),
    ("ceval", "lm_eval", "computer_network", SPACED, 126264),
])
def test_letter_ids_are_the_continuation_tokens(rows, encode, benchmark, protocol, subject, letters, cue_id):
    p = get_protocol(benchmark, protocol)
    dev, val = rows(benchmark, subject, "dev"), rows(benchmark, subject, "val")
    req = build_request(p, encode, subject, dev, val[0], 5, 4096)
    assert req.continuations == letters
    assert req.shots == 5 and not req.truncated
    assert req.context == encode(p.context(subject, dev[:5], val[0]))
    assert req.context[-1] == cue_id
    # encoding the letter alone would give something else: " A" -> ['▁▁', 'A'], "A" -> '▁A'
    assert encode(" A") == [390, 126173] and encode("A") == [459]


def test_encode_pair_moves_trailing_space_into_continuation(encode):
    ctx, cont = encode_pair(encode, "Answer: ", "A")
    assert ctx == encode("Answer:") and cont == [459]


def test_shots_dropped_one_at_a_time_then_left_truncated(rows, encode):
    p = get_protocol("mmlu", "official")
    dev, test = rows("mmlu", "high_school_european_history", "dev"), rows("mmlu", "high_school_european_history", "test")
    lengths = [len(encode(p.context("high_school_european_history", dev[:k], test[0]))) for k in range(6)]
    assert lengths == sorted(lengths) and lengths[5] > lengths[3] + 100
    req = build_request(p, encode, "high_school_european_history", dev, test[0], 5, max_length=lengths[3])
    assert req.shots == 3 and not req.truncated  # the first 3 dev rows, as hendrycks' k -= 1 loop keeps
    assert req.context == encode(p.context("high_school_european_history", dev[:3], test[0]))
    req = build_request(p, encode, "high_school_european_history", dev, test[0], 5, max_length=lengths[3] - 1)
    assert req.shots == 2
    req = build_request(p, encode, "high_school_european_history", dev, test[0], 5, max_length=50)
    full = encode(p.context("high_school_european_history", [], test[0]))
    assert req.shots == 0 and req.truncated and req.context == full[-50:]

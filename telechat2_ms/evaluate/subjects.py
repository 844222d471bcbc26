"""Subject tables of MMLU and C-Eval: display names and categories, built in so that a user's plain data
directory (hendrycks `data.tar`, `ceval-exam.zip`) needs no extra files.

Sources (docs/eval_protocols.md): MMLU subject -> subcategory -> category is `categories.py` of
hendrycks/test @ 4450500; lm-evaluation-harness groups differ only by putting `anatomy` in STEM
(`lm_eval/tasks/mmlu/_generate_configs.py`). C-Eval is the official `subject_mapping.json` of
hkust-nlp/ceval @ cba65ae ([English name, Chinese name, category]); C-Eval Hard is its 8-subject list.
tests/test_eval_data.py checks these tables against the copies in ../shared/data.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

# ---- MMLU ---------------------------------------------------------------------------------------------

MMLU_SUBCATEGORY: Dict[str, str] = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}

# hendrycks names the last category "other (business, health, misc.)"; we print it as "other".
MMLU_SUBCATEGORY_TO_CATEGORY: Dict[str, str] = {
    "physics": "STEM", "chemistry": "STEM", "biology": "STEM", "computer science": "STEM", "math": "STEM",
    "engineering": "STEM",
    "history": "humanities", "philosophy": "humanities", "law": "humanities",
    "politics": "social sciences", "culture": "social sciences", "economics": "social sciences",
    "geography": "social sciences", "psychology": "social sciences",
    "other": "other", "business": "other", "health": "other",
}
MMLU_CATEGORIES: Tuple[str, ...] = ("STEM", "humanities", "social sciences", "other")
# lm-evaluation-harness (and OpenCompass) groups: identical except this subject moves to STEM.
_LM_EVAL_MMLU_MOVES = {"anatomy": "STEM"}

# ---- C-Eval -------------------------------------------------------------------------------------------

# subject -> (English name, Chinese name, category), in the order of the official subject_mapping.json.
CEVAL_SUBJECTS: Dict[str, Tuple[str, str, str]] = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("Ideological and Moral Cultivation", "思想道德修养与法律基础",
                                          "Humanities"),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": ("Chinese Language and Literature", "中国语言文学", "Humanities"),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("Environmental Impact Assessment Engineer",
                                                 "环境影响评价工程师", "Other"),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}
CEVAL_CATEGORIES: Tuple[str, ...] = ("STEM", "Social Science", "Humanities", "Other")
CEVAL_HARD: Tuple[str, ...] = (
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
    "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics",
)

BENCHMARKS: Tuple[str, ...] = ("mmlu", "ceval")


def known_subjects(benchmark: str) -> List[str]:
    """All subjects of a benchmark, sorted alphabetically (the order hendrycks' script uses)."""
    if benchmark == "mmlu":
        return sorted(MMLU_SUBCATEGORY)
    if benchmark == "ceval":
        return sorted(CEVAL_SUBJECTS)
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")


def subject_category(benchmark: str, subject: str, convention: str = "official") -> str:
    """Category of a subject. MMLU has two conventions: 'official' (hendrycks categories.py) and
    'lm_eval' (anatomy in STEM); C-Eval has one."""
    if benchmark == "mmlu":
        if subject not in MMLU_SUBCATEGORY:
            raise ValueError(f"unknown MMLU subject {subject!r}")
        if convention == "lm_eval" and subject in _LM_EVAL_MMLU_MOVES:
            return _LM_EVAL_MMLU_MOVES[subject]
        return MMLU_SUBCATEGORY_TO_CATEGORY[MMLU_SUBCATEGORY[subject]]
    if benchmark == "ceval":
        if subject not in CEVAL_SUBJECTS:
            raise ValueError(f"unknown C-Eval subject {subject!r}")
        return CEVAL_SUBJECTS[subject][2]
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")


def benchmark_categories(benchmark: str) -> Tuple[str, ...]:
    """Category names in the order leaderboards print them."""
    return MMLU_CATEGORIES if benchmark == "mmlu" else CEVAL_CATEGORIES


def extra_groups(benchmark: str) -> Dict[str, Tuple[str, ...]]:
    """Named subject groups reported besides the categories (C-Eval Hard)."""
    return {"C-Eval Hard": CEVAL_HARD} if benchmark == "ceval" else {}

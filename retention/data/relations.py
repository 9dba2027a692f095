"""Relation templates keyed by Wikidata relation id, and augmentation phrasings drawn from them.

The table covers the 34 relations of CounterFact (and the built-in set uses the same ids). Each relation has a
main template and at least five more phrasings, written for this project; every template holds one ``{}``
for the subject and ends right before the object. Augmentation phrasings (paraphrase augmentation while
editing, Wen & Zhang 2025) are drawn from a record's relation, never from its evaluation paraphrases.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from difflib import SequenceMatcher

from retention.records import KnowledgeRecord


@dataclass(frozen=True)
class Relation:
    id: str
    """Wikidata property id, e.g. ``"P36"``."""
    name: str
    templates: tuple[str, ...]
    """The main template first, then the other phrasings."""


def _r(rid: str, name: str, *templates: str) -> tuple[str, Relation]:
    return rid, Relation(rid, name, templates)


RELATIONS: dict[str, Relation] = dict([
    _r("P17", "country",
       "{} is located in the country of", "{} is situated in the country of", "The country that contains {} is",
       "{} can be found in the nation of", "{} lies within the borders of", "Geographically, {} belongs to",
       "On a political map, {} is part of"),
    _r("P19", "place of birth",
       "{} was born in", "The birthplace of {} is", "{}'s place of birth is", "The place where {} was born is",
       "{} came into the world in", "{} first saw the light of day in", "At birth, {} was living in"),
    _r("P20", "place of death",
       "{} died in", "The place where {} died is", "{}'s place of death is", "{} breathed their last in",
       "{} spent their final days in", "The town in which {} passed away is", "Death came to {} in"),
    _r("P27", "country of citizenship",
       "{} is a citizen of", "{} is a national of", "The country of citizenship of {} is",
       "{}'s country of citizenship is", "{} carries a passport issued by", "Legally, {} is a citizen of",
       "The state that {} is a citizen of is", "{} holds the nationality of", "By nationality, {} belongs to"),
    _r("P30", "continent",
       "{} is located on the continent of", "The continent on which {} lies is", "{}'s continent is",
       "{} can be found on the continent of", "On a world map, {} lies in", "{} sits on the landmass of",
       "The continent that contains {} is"),
    _r("P36", "capital",
       "The capital of {} is", "The capital city of {} is", "{}'s seat of government is in",
       "{} has its capital in", "The city that serves as the capital of {} is", "{} is governed from",
       "{}'s capital is the city of"),
    _r("P37", "official language",
       "The official language of {} is", "{} has the official language", "In {}, the official language is",
       "The language with official status in {} is", "Government business in {} is conducted in",
       "People in {} officially use the language", "{}'s official language is"),
    _r("P39", "position held",
       "{} holds the position of", "{} served as", "The position held by {} is", "{} held the office of",
       "{} was appointed to the position of", "{}'s official title was", "The office of {} was that of"),
    _r("P101", "field of work",
       "{} works in the field of", "The field of work of {} is", "{}'s area of expertise is",
       "{} is active in the discipline of", "The discipline {} focuses on is", "Professionally, {} focuses on",
       "{} is known for work in the field of"),
    _r("P103", "native language",
       "The native language of {} is", "{}'s first language is", "The language {} grew up speaking is",
       "As a child, {} first learned to speak", "{}'s mother tongue is", "The first language spoken by {} was",
       "{} natively speaks"),
    _r("P106", "occupation",
       "The occupation of {} is", "{}'s profession is", "The job of {} is", "{}'s occupation is",
       "The line of work of {} is", "By profession, {} is", "The profession practised by {} is"),
    _r("P108", "employer",
       "{} is employed by", "{} works for", "The employer of {} is", "{}'s employer is",
       "{} is on the payroll of", "{} draws a salary from", "The organisation that employs {} is"),
    _r("P127", "owned by",
       "{} is owned by", "The owner of {} is", "{} belongs to", "{}'s parent company is", "{} is a property of",
       "Ownership of {} rests with", "{} is in the hands of"),
    _r("P131", "located in the administrative territorial entity",
       "{} is located in", "{} is situated in", "The administrative area that contains {} is", "{} lies in",
       "The location of {} is", "{} sits within", "{}'s location is"),
    _r("P136", "genre",
       "The genre of {} is", "{}'s genre is", "{} belongs to the genre of", "{} is best described by the genre",
       "Stylistically, {} falls under", "The genre associated with {} is", "In terms of genre, {} is"),
    _r("P138", "named after",
       "{} is named after", "{} was named for", "{} takes its name from", "The namesake of {} is",
       "{} gets its name from", "{} bears the name of", "The name of {} comes from"),
    _r("P140", "religion",
       "{} follows the religion of", "The religion of {} is", "{} is a follower of",
       "{}'s religious affiliation is", "{} practises the faith of", "The faith followed by {} is",
       "{} adheres to"),
    _r("P159", "headquarters location",
       "{} is headquartered in", "The headquarters of {} are located in", "{}'s head office is in",
       "{} has its main office in", "The city where {} has its headquarters is",
       "{} runs its operations from headquarters in", "{}'s main base is in"),
    _r("P176", "manufacturer",
       "{} is manufactured by", "{} is made by", "The manufacturer of {} is", "{} was built by",
       "The company that makes {} is", "{} comes from the manufacturer", "{}'s maker is"),
    _r("P178", "developer",
       "{} was developed by", "The developer of {} is", "{}'s developer is", "The company that developed {} is",
       "{} was designed and built by", "{} comes from the developer", "The creator of {} is"),
    _r("P190", "twinned administrative body",
       "{} is a twin city of", "{} is twinned with", "The sister city of {} is", "{}'s sister city is",
       "One of the twin towns of {} is", "A city twinned with {} is", "{} has a twinning partnership with"),
    _r("P264", "record label",
       "{} is signed to", "The record label of {} is", "{}'s record label is", "{} records for the label",
       "{} released music on the label", "{} has a record deal with", "The label that releases {}'s music is"),
    _r("P276", "location",
       "{} is located in", "The location of {} is", "{} can be found in", "{} is situated in",
       "The place where {} is located is", "{} is sited in", "{}'s location is", "{} has its home in",
       "Visitors travel to {} in the city of"),
    _r("P364", "original language of film or TV show",
       "The original language of {} is", "{} was originally made in", "{}'s original language is",
       "The language in which {} was first released is", "The language of the original version of {} is",
       "In its original version, {} is in", "{} was first produced in the language"),
    _r("P407", "language of work or name",
       "{} is written in", "The language of {} is", "{} uses the language", "The language used in {} is",
       "{}'s language is", "{} appears in the language", "{} is published in the language"),
    _r("P413", "position played on team",
       "{} plays in the position of", "The position played by {} is", "{}'s playing position is",
       "On the field, {} plays", "{} lines up at the position of", "{}'s position on the team is",
       "The role {} plays on the team is"),
    _r("P449", "original broadcaster",
       "{} was originally aired on", "{} first aired on", "The original network of {} is",
       "{} was first broadcast on", "{} debuted on the network", "{}'s original broadcaster is",
       "The channel that first showed {} is"),
    _r("P463", "member of",
       "{} is a member of", "{} has membership in", "{} holds membership in", "{} is affiliated with",
       "{} is part of the organisation", "The organisation that counts {} as a member is", "{} joined"),
    _r("P495", "country of origin",
       "{} was created in the country of", "{} originated in", "The country of origin of {} is",
       "{} comes from the country of", "{} was first made in", "{}'s country of origin is",
       "{} has its origins in"),
    _r("P641", "sport",
       "{} plays the sport of", "The sport played by {} is", "{}'s sport is", "{} competes professionally in",
       "{} is an athlete who plays", "The sport {} is known for is", "On the pitch or court, {} plays"),
    _r("P740", "location of formation",
       "{} was formed in", "The place where {} was formed is", "{} got its start in", "{} came together in",
       "The location of formation of {} is", "{} originated in the city of", "{} was founded in the city of"),
    _r("P937", "work location",
       "{} worked in the city of", "{} worked in", "The city where {} worked is", "{}'s place of work was",
       "{} was employed in the city of", "{} spent their working life in", "The work location of {} was"),
    _r("P1303", "instrument",
       "{} plays the", "The instrument played by {} is the", "{}'s instrument is the",
       "{} is a musician who plays the", "{} performs on the", "{} is known for playing the",
       "The musical instrument of {} is the"),
    _r("P1412", "languages spoken, written or signed",
       "{} speaks", "{} speaks the language", "The language {} speaks is", "{} is fluent in",
       "{} communicates in", "A language spoken by {} is", "{} writes and speaks"),
])  # fmt: skip


def relation_templates(relation_id: str) -> list[str]:
    """The templates of a relation, main template first (CounterFact's table, then the built-in set's)."""
    from retention.data.builtin_facts import RELATIONS as BUILTIN_RELATIONS

    if relation_id in RELATIONS:
        return list(RELATIONS[relation_id].templates)
    builtin = {rel.relation_id: rel for rel in BUILTIN_RELATIONS}
    if relation_id in builtin:
        return list(builtin[relation_id].templates)
    known = ", ".join(sorted(set(RELATIONS) | set(builtin)))
    raise KeyError(f"no templates for relation id {relation_id!r} (known: {known})")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _around_subject(prompt: str, subject: str) -> tuple[list[str], list[str]] | None:
    """Words before the subject (in its sentence) and after it; None when the subject is absent."""
    at = prompt.rfind(subject)
    if at < 0:
        return None
    before = re.split(r"[.!?\n]\s", prompt[:at])[-1]
    return _words(before), _words(prompt[at + len(subject) :])


def resembles(template: str, subject: str, prompt: str) -> bool:
    """Whether ``template`` filled with ``subject`` says what the full ``prompt`` says.

    Compares the words around the subject (unrelated leading sentences, as in CounterFact's paraphrases,
    are cut off): equal, one a contiguous part of the other, or similar (difflib ratio >= 0.7).
    """
    filled = template.format(subject)
    ours, theirs = _around_subject(filled, subject), _around_subject(prompt, subject)
    if theirs is None:
        a, b = _words(filled), _words(prompt)
    else:
        (a_pre, a_post), (b_pre, b_post) = ours, theirs
        a = a_pre + ["\0"] + a_post
        b = b_pre[-(len(a_pre) + 1) :] + ["\0"] + b_post
    sa, sb = f" {' '.join(a)} ", f" {' '.join(b)} "
    return sa in sb or sb in sa or SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.7


def augmentation_phrasings(record: KnowledgeRecord, k: int, seed: int = 0) -> list[str]:
    """``k`` templates of the record's relation for editing, seeded per record.

    Excluded: the record's own template, templates that resemble any of its evaluation paraphrases and its
    existing augmentations. Raises when the relation has fewer than ``k`` such templates.
    """
    if k < 0:
        raise ValueError(f"k={k}: must be >= 0")
    if k == 0:
        return []
    try:
        templates = relation_templates(record.relation_id)
    except KeyError as e:
        raise KeyError(f"record {record.case_id}: {e.args[0]}") from None
    own = " ".join(_words(record.prompt))
    candidates = [
        t for t in templates
        if " ".join(_words(t)) != own
        and t not in record.augmentations
        and not any(resembles(t, record.subject, p) for p in record.paraphrases)
    ]  # fmt: skip
    if len(candidates) < k:
        raise ValueError(
            f"record {record.case_id} ({record.relation_id}): only {len(candidates)} template(s) differ from its "
            f"prompt and evaluation paraphrases, {k} requested"
        )
    return random.Random(f"{seed}:{record.case_id}").sample(candidates, k)
